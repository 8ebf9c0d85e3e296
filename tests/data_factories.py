"""Small dataset files in the exact on-disk formats, for tests.

- :func:`write_mini_imagenet_cache`: learn2learn's ``mini-imagenet-cache-{mode}.pkl``.
- :func:`write_cifar100`: torchvision's ``cifar-100-python/{train,test,meta}``, written as
  Python 2 ``cPickle`` protocol 2 files like the real ones (``str`` as byte strings).
- :func:`write_malicious_pickle`, :func:`write_html_page`, :func:`truncate_file`: bad files.

Example::

    cache = write_mini_imagenet_cache(tmp_path, "test", num_classes=5, images_per_class=20)
    dataset = MiniImageNet(tmp_path, "test", strict=False)
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from l2l_adversarial.task import Task

#: CIFAR-100's 20 superclasses and their 5 fine classes each (names as in its ``meta`` file).
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
#: The 100 fine label names in the order of CIFAR-100's ``meta`` file (label i = name i).
CIFAR100_FINE_LABEL_NAMES: tuple[str, ...] = tuple(
    sorted(name for names in CIFAR100_SUPERCLASSES.values() for name in names)
)
#: The 20 coarse label names in the order of CIFAR-100's ``meta`` file.
CIFAR100_COARSE_LABEL_NAMES: tuple[str, ...] = tuple(sorted(CIFAR100_SUPERCLASSES))


# The pure-Python pickler: unlike the C one, its per-type dispatch table can be extended.
_PurePythonPickler: Any = pickle._Pickler


class _Python2Pickler(_PurePythonPickler):
    """Protocol 2 pickler writing ``str`` and ``bytes`` as Python 2 byte strings, as cPickle did."""

    dispatch = dict(_PurePythonPickler.dispatch)

    def save_python2_str(self, obj: str | bytes) -> None:
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_python2_str
    dispatch[bytes] = save_python2_str


def dump_python2_pickle(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as Python 2's cPickle (protocol 2) would have: CIFAR-100's file format."""
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


@dataclass
class MiniImageNetCache:
    """What :func:`write_mini_imagenet_cache` wrote."""

    path: Path
    images: np.ndarray
    class_dict: dict[str, list[int]]


def write_mini_imagenet_cache(
    root: str | os.PathLike[str],
    mode: str = "train",
    *,
    num_classes: int = 5,
    images_per_class: int = 20,
    image_size: int = 84,
    seed: int = 0,
    protocol: int = 4,
) -> MiniImageNetCache:
    """Write ``root/mini-imagenet-cache-{mode}.pkl`` with random images.

    Class names look like WordNet ids and are inserted in reverse-sorted order; each class's
    rows are scattered over the array (as a shuffled cache would be).
    """
    rng = np.random.default_rng(seed)
    count = num_classes * images_per_class
    images = rng.integers(0, 256, size=(count, image_size, image_size, 3), dtype=np.uint8)
    rows = rng.permutation(count)
    names = sorted((f"n{1000000 + 37 * i:08d}" for i in range(num_classes)), reverse=True)
    class_dict = {
        name: rows[i * images_per_class : (i + 1) * images_per_class].tolist()
        for i, name in enumerate(names)
    }
    path = Path(root) / f"mini-imagenet-cache-{mode}.pkl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        pickle.dump({"image_data": images, "class_dict": class_dict}, file, protocol=protocol)
    return MiniImageNetCache(path, images, class_dict)


@dataclass
class CIFAR100Files:
    """What :func:`write_cifar100` wrote: per file part ("train", "test"), rows and labels."""

    folder: Path
    data: dict[str, np.ndarray]
    fine_labels: dict[str, np.ndarray]


def write_cifar100(
    root: str | os.PathLike[str],
    *,
    train_per_class: int = 4,
    test_per_class: int = 2,
    seed: int = 0,
    python2: bool = True,
) -> CIFAR100Files:
    """Write ``root/cifar-100-python/{train,test,meta}`` with random 32 x 32 images.

    ``python2=True`` writes the real files' flavour (Python 2 protocol 2, byte-string keys);
    ``python2=False`` writes Python 3 pickles with ``str`` keys.
    """
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    coarse_of = {
        fine: CIFAR100_COARSE_LABEL_NAMES.index(coarse)
        for coarse, names in CIFAR100_SUPERCLASSES.items()
        for fine in names
    }
    data, fine_labels = {}, {}
    for part, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(100), per_class))
        rows = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        data[part], fine_labels[part] = rows, labels
        record = {
            "filenames": [f"image_{part}_{i:06d}.png" for i in range(len(labels))],
            "batch_label": f"{'training' if part == 'train' else 'testing'} batch 1 of 1",
            "fine_labels": labels.tolist(),
            "coarse_labels": [coarse_of[CIFAR100_FINE_LABEL_NAMES[i]] for i in labels],
            "data": rows,
        }
        _dump(record, folder / part, python2)
    meta = {
        "fine_label_names": list(CIFAR100_FINE_LABEL_NAMES),
        "coarse_label_names": list(CIFAR100_COARSE_LABEL_NAMES),
    }
    _dump(meta, folder / "meta", python2)
    return CIFAR100Files(folder, data, fine_labels)


def _dump(obj: Any, path: Path, python2: bool) -> None:
    if python2:
        dump_python2_pickle(obj, path)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(obj, protocol=4))


class _Payload:
    """Unpickling this calls ``function(argument)``."""

    def __init__(self, function: Any, argument: str) -> None:
        self.function, self.argument = function, argument

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return self.function, (self.argument,)


def write_malicious_pickle(
    path: str | os.PathLike[str], marker: str | os.PathLike[str], via: str = "os.system"
) -> Path:
    """A dataset-looking pickle whose loading creates the file ``marker``.

    ``via`` picks the payload: ``"os.system"`` (runs ``touch marker``) or ``"builtins.exec"``
    (runs Python that creates ``marker``). The payload sits inside an otherwise valid
    mini-ImageNet cache dict.
    """
    payloads = {
        "os.system": _Payload(os.system, f"touch '{marker}'"),
        "builtins.exec": _Payload(exec, f"open({str(marker)!r}, 'w').close()"),
    }
    cache = {"image_data": np.zeros((1, 84, 84, 3), np.uint8), "class_dict": payloads[via]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(cache, protocol=4))
    return path


def write_html_page(path: str | os.PathLike[str]) -> Path:
    """What a failed Google Drive download saves: its HTML warning page."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head>"
        "<body>Google Drive can't scan this file for viruses.</body></html>\n"
    )
    return path


def truncate_file(path: str | os.PathLike[str], keep_fraction: float = 0.5) -> Path:
    """Cut a file to its first ``keep_fraction`` of bytes, like an interrupted download."""
    path = Path(path)
    content = path.read_bytes()
    path.write_bytes(content[: int(len(content) * keep_fraction)])
    return path


class SyntheticTasks:
    """3-way tasks on 1x16x16 images (noisy class prototypes), a pure function of (seed, index).

    A stand-in for :class:`l2l_adversarial.data.FewShotTasks` in training tests.
    """

    def __init__(self, seed: int = 0, ways: int = 3, shots: int = 1, queries: int = 2) -> None:
        self.seed, self.ways, self.shots, self.queries = seed, ways, shots, queries

    def __getitem__(self, index: int) -> Task:
        g = torch.Generator().manual_seed(self.seed * 100_003 + index)
        prototypes = torch.rand(self.ways, 1, 16, 16, generator=g)

        def draw(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
            labels = torch.arange(self.ways).repeat_interleave(per_class)
            noise = 0.1 * torch.rand(len(labels), 1, 16, 16, generator=g)
            return (0.9 * prototypes[labels] + noise).clamp(0, 1), labels

        return Task(*draw(self.shots), *draw(self.queries))


# -- every format of a dataset, holding the same images ---------------------------------------
def random_images(count: int, size: int, seed: int, channels: int = 3) -> np.ndarray:
    """Smooth random uint8 images (count, size, size, channels): blocks of 4 x 4 pixels plus
    noise, so that JPEG keeps them recognisable."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(count, -(-size // 4), -(-size // 4), channels))
    images = blocks.repeat(4, axis=1).repeat(4, axis=2)[:, :size, :size]
    noise = rng.integers(-12, 13, size=images.shape)
    return np.clip(images + noise, 0, 255).astype(np.uint8)


def encode_image(array: np.ndarray, suffix: str = ".png") -> bytes:
    """``array`` (H x W x C or H x W uint8) encoded by Pillow as PNG or JPEG (quality 90)."""
    from PIL import Image

    buffer = io.BytesIO()
    image = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)
    image.save(buffer, format="PNG" if suffix == ".png" else "JPEG", quality=90)
    return buffer.getvalue()


def decode_like_the_package(data: bytes) -> np.ndarray:
    """H x W x C pixels of encoded ``data`` by the package's decoder (Pillow, RGB)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


@dataclass
class MiniImageNetFormats:
    """What :func:`write_mini_imagenet_formats` wrote: one root per format and the pixels."""

    roots: dict[str, Path]
    #: per class name, its images (H x W x 3) as decoded from the JPEG files
    pixels: dict[str, np.ndarray]


def write_mini_imagenet_formats(
    root: str | os.PathLike[str],
    modes: tuple[str, ...] = ("train", "validation", "test"),
    *,
    num_classes: int = 4,
    images_per_class: int = 5,
    image_size: int = 84,
    seed: int = 0,
) -> MiniImageNetFormats:
    """The same images in all four MiniImageNet formats, each in its own folder of ``root``.

    The images are written as JPEG (Ravi & Larochelle's ``images/`` + csv) and their decoded
    pixels go into learn2learn's pickle, torchmeta's hdf5 + json and MetaOptNet's Python 2
    pickle, each file ordering images and classes differently (as real copies do).
    """
    import h5py

    root = Path(root)
    roots = {
        "learn2learn": root / "learn2learn",
        "torchmeta": root / "torchmeta",
        "metaoptnet": root / "metaoptnet",
        "ravi": root / "ravi",
    }
    split_names = {"train": "train", "validation": "val", "test": "test"}
    metaoptnet_names = {"train": "train_phase_train", "validation": "val", "test": "test"}
    pixels: dict[str, np.ndarray] = {}
    (roots["ravi"] / "images").mkdir(parents=True, exist_ok=True)
    for number, mode in enumerate(modes):
        rng = np.random.default_rng(seed + number)
        names = [f"n{2000000 + 101 * (number * 100 + i):08d}" for i in range(num_classes)]
        images = random_images(num_classes * images_per_class, image_size, seed + 10 * number)
        rows = [["filename", "label"]]
        decoded = []
        for index, image in enumerate(images):
            name = names[index // images_per_class]
            filename = f"{name}{index:08d}.jpg"
            data = encode_image(image, ".jpg")
            (roots["ravi"] / "images" / filename).write_bytes(data)
            rows.append([filename, name])
            decoded.append(decode_like_the_package(data))
        all_pixels = np.stack(decoded)
        for i, name in enumerate(names):
            pixels[name] = all_pixels[i * images_per_class : (i + 1) * images_per_class]
        shuffled = [rows[0]] + [rows[1 + i] for i in rng.permutation(len(rows) - 1)]
        with (roots["ravi"] / f"{split_names[mode]}.csv").open("w", newline="") as file:
            file.write("\n".join(",".join(row) for row in shuffled) + "\n")
        labels = np.repeat(np.arange(num_classes), images_per_class)
        # learn2learn: rows shuffled, class_dict in reverse name order
        order = rng.permutation(len(labels))
        class_dict = {
            names[c]: [int(np.flatnonzero(order == i)[0]) for i in np.flatnonzero(labels == c)]
            for c in reversed(range(num_classes))
        }
        roots["learn2learn"].mkdir(parents=True, exist_ok=True)
        with (roots["learn2learn"] / f"mini-imagenet-cache-{mode}.pkl").open("wb") as file:
            pickle.dump({"image_data": all_pixels[order], "class_dict": class_dict}, file, 4)
        # torchmeta: one dataset per class, each class's images reversed
        folder = roots["torchmeta"] / "miniimagenet"
        folder.mkdir(parents=True, exist_ok=True)
        with h5py.File(folder / f"{split_names[mode]}_data.hdf5", "w") as file:
            group = file.create_group("datasets")
            for name in names:
                group.create_dataset(name, data=pixels[name][::-1])
        (folder / f"{split_names[mode]}_labels.json").write_text(json.dumps(sorted(names)))
        # MetaOptNet: Python 2 pickle, other shuffle, labels numbered from 64 * number
        order = rng.permutation(len(labels))
        record = {
            "data": all_pixels[order],
            "labels": [int(64 * number + labels[i]) for i in order],
            "catname2label": {name: 64 * number + c for c, name in enumerate(names)},
        }
        dump_python2_pickle(
            record,
            roots["metaoptnet"]
            / "miniImageNet"
            / f"miniImageNet_category_split_{metaoptnet_names[mode]}.pickle",
        )
    return MiniImageNetFormats(roots, pixels)


def write_metaoptnet_cifar(
    root: str | os.PathLike[str], files: CIFAR100Files, split: str, seed: int = 0
) -> Path:
    """MetaOptNet's ``CIFAR_FS_*.pickle`` or ``FC100_*.pickle`` (Python 2) in ``root``, holding
    the images of ``files`` (written by :func:`write_cifar100`) of the split's classes,
    shuffled; labels are CIFAR-100 fine label ids."""
    from l2l_adversarial.data.cifar_fs import few_shot_cifar_split

    rng = np.random.default_rng(seed)
    prefix = {"cifar-fs": "CIFAR_FS", "fc100": "FC100"}[split]
    rows = np.concatenate([files.data["train"], files.data["test"]])
    fine = np.concatenate([files.fine_labels["train"], files.fine_labels["test"]])
    for mode, classes in few_shot_cifar_split(split).items():
        ids = [CIFAR100_FINE_LABEL_NAMES.index(name) for name in classes]
        keep = rng.permutation(np.flatnonzero(np.isin(fine, ids)))
        record = {
            "data": rows[keep].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(),
            "labels": fine[keep].tolist(),
        }
        name = {"train": "train", "validation": "val", "test": "test"}[mode]
        dump_python2_pickle(record, Path(root) / f"{prefix}_{name}.pickle")
    return Path(root)


def write_tiered_imagenet(
    root: str | os.PathLike[str],
    mode: str = "train",
    *,
    num_classes: int = 4,
    images_per_class: int = 3,
    image_size: int = 84,
    seed: int = 0,
    names: bool = True,
    as_arrays: bool = True,
) -> np.ndarray:
    """Ren et al.'s ``{split}_images_png.pkl`` + ``{split}_labels.pkl`` (Python 2 pickles).

    Images are PNG-encoded (each a uint8 array of shape (n, 1), as OpenCV's imencode gives,
    or a byte string with ``as_arrays=False``); returns the images (N, H, W, 3) in file order.
    """
    rng = np.random.default_rng(seed)
    split = {"train": "train", "validation": "val", "test": "test"}[mode]
    labels = rng.permutation(np.repeat(np.arange(num_classes), images_per_class))
    images = random_images(len(labels), image_size, seed)
    encoded = [encode_image(image) for image in images]
    items: list[Any] = (
        [np.frombuffer(data, np.uint8).reshape(-1, 1).copy() for data in encoded]
        if as_arrays
        else encoded
    )
    record: dict[str, Any] = {
        "label_specific": labels.astype(np.int64),
        "label_general": (labels // 2).astype(np.int64),
    }
    if names:
        record["label_specific_str"] = [f"n{3000000 + 7 * c:08d}" for c in range(num_classes)]
        record["label_general_str"] = [f"n{4000000 + g:08d}" for g in range(num_classes)]
    dump_python2_pickle(items, Path(root) / f"{split}_images_png.pkl")
    dump_python2_pickle(record, Path(root) / f"{split}_labels.pkl")
    return images


def write_omniglot(
    root: str | os.PathLike[str],
    *,
    alphabets: tuple[int, int] = (3, 2),
    characters: int = 4,
    drawers: int = 3,
    seed: int = 0,
) -> Path:
    """torchvision's ``root/omniglot-py/images_background`` and ``images_evaluation``:
    ``<alphabet>/character<NN>/<id>_<drawer>.png``, 105 x 105 one-bit images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = Path(root) / "omniglot-py"
    for set_name, count in zip(("images_background", "images_evaluation"), alphabets, strict=True):
        for a in range(count):
            alphabet = folder / set_name / f"Alphabet_{set_name[7]}{a}"
            for c in range(1, characters + 1):
                character = alphabet / f"character{c:02d}"
                character.mkdir(parents=True, exist_ok=True)
                for d in range(1, drawers + 1):
                    strokes = rng.random((105, 105)) > 0.2
                    Image.fromarray(strokes).convert("1").save(
                        character / f"{a:02d}{c:02d}_{d:02d}.png"
                    )
    return folder


def write_image_folder(
    root: str | os.PathLike[str],
    *,
    classes: int = 6,
    per_class: int = 4,
    size: int = 40,
    seed: int = 0,
) -> Path:
    """``root/<class>/<images>``: mixed PNG and JPEG files of ``size`` pixels, plus a stray
    text file (ignored) in one class folder."""
    root = Path(root)
    images = random_images(classes * per_class, size, seed)
    for index, image in enumerate(images):
        folder = root / f"class_{index // per_class:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        suffix = ".png" if index % 2 else ".JPG"
        (folder / f"image_{index:03d}{suffix}").write_bytes(encode_image(image, suffix.lower()))
    (root / "class_00" / "notes.txt").write_text("not an image")
    return root


def digits_config(method: str = "adml", **train: object) -> dict:
    """A tiny digits run's config (3-way 1-shot, hidden 4); ``train`` overrides ``train.*``."""
    from l2l_adversarial.app.config import load_config

    train = {"iterations": 6, "meta_batch_size": 2, "adaptation_steps": 2, "checkpoint_every": 2,
             "log_every": 1, "inner_lr": 0.1, **train}  # fmt: skip
    overrides = [f"method={method}", "dataset.name=digits", "device=cpu", "task.ways=3",
                 "task.shots=1", "task.query_shots=2", "model.hidden=4"]  # fmt: skip
    return load_config(None, overrides + [f"train.{k}={v}" for k, v in train.items()])
