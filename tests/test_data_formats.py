"""Every on-disk format of every dataset, on small generated files: same images and tasks across
formats, auto-detection, the memory-mapped decode cache and its checks, and the errors."""

from __future__ import annotations

import json
import logging
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_factories import (
    CIFAR100_SUPERCLASSES,
    MiniImageNetFormats,
    dump_python2_pickle,
    truncate_file,
    write_cifar100,
    write_image_folder,
    write_malicious_pickle,
    write_metaoptnet_cifar,
    write_mini_imagenet_formats,
    write_omniglot,
    write_tiered_imagenet,
)

from l2l_adversarial.data import FewShotTasks, MiniImageNet, load_class_split
from l2l_adversarial.data.cache import CACHE_FOLDER
from l2l_adversarial.data.cifar_fs import CIFARFS, FC100, few_shot_cifar_split
from l2l_adversarial.data.device import image_table
from l2l_adversarial.data.errors import (
    DatasetFileError,
    DatasetNotFoundError,
    UnsafePickleError,
)
from l2l_adversarial.data.folders import ImageFolderSplit, Omniglot
from l2l_adversarial.data.tiered_imagenet import TieredImageNet
from l2l_adversarial.errors import UserError

FORMATS = ("learn2learn", "torchmeta", "metaoptnet", "ravi")


def assert_same_tasks(first: FewShotTasks, second: FewShotTasks, count: int = 4) -> None:
    for index in range(count):
        a, b = first[index], second[index]
        assert torch.equal(a.support_inputs, b.support_inputs)
        assert torch.equal(a.query_inputs, b.query_inputs)
        assert torch.equal(a.support_labels, b.support_labels)


@pytest.fixture(scope="module")
def mini_formats(tmp_path_factory: pytest.TempPathFactory) -> MiniImageNetFormats:
    return write_mini_imagenet_formats(
        tmp_path_factory.mktemp("mini"), ("train", "test"), num_classes=4, images_per_class=5
    )


# -- MiniImageNet: four formats, one dataset -------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "test"])
def test_every_mini_imagenet_format_gives_the_same_rows_and_tasks(
    mini_formats: MiniImageNetFormats, mode: str
) -> None:
    datasets = {
        name: MiniImageNet(root, mode, strict=False, cache_dir=False)
        for name, root in mini_formats.roots.items()
    }
    reference = datasets["learn2learn"]
    assert reference.classes == sorted(
        name for name in mini_formats.pixels if name in reference.classes
    )
    for name, dataset in datasets.items():
        assert dataset.format == name  # auto-detected
        assert dataset.images.shape == (20, 3, 84, 84) and dataset.images.dtype == np.uint8
        np.testing.assert_array_equal(dataset.images, reference.images)
        np.testing.assert_array_equal(dataset.targets, reference.targets)
        assert dataset.classes == reference.classes
        assert_same_tasks(
            FewShotTasks(dataset, 3, 1, 2, seed=7), FewShotTasks(reference, 3, 1, 2, seed=7)
        )
    for label, name in enumerate(reference.classes):  # the JPEGs' pixels, as Pillow decodes them
        rows = reference.images[reference.targets == label].transpose(0, 2, 3, 1)
        assert sorted(r.tobytes() for r in rows) == sorted(
            r.tobytes() for r in mini_formats.pixels[name]
        )


def test_a_named_format_is_read_and_a_missing_one_is_listed(
    tmp_path: Path, mini_formats: MiniImageNetFormats
) -> None:
    root = tmp_path / "both"
    root.mkdir()
    for name in ("ravi", "metaoptnet"):
        for entry in mini_formats.roots[name].iterdir():
            if entry.name != CACHE_FOLDER:
                (root / entry.name).symlink_to(entry)
    assert MiniImageNet(root, "test", strict=False, cache_dir=False).format == "metaoptnet"
    assert MiniImageNet(root, "test", strict=False, format="ravi", cache_dir=False).format == "ravi"
    with pytest.raises(DatasetNotFoundError, match="format 'torchmeta'") as missing:
        MiniImageNet(root, "test", strict=False, format="torchmeta")
    assert "test_data.hdf5" in str(missing.value) and "learn2learn" not in str(missing.value)
    with pytest.raises(ValueError, match="format must be one of"):
        MiniImageNet(root, "test", format="hdf5")


def test_a_root_without_any_format_lists_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as missing:
        MiniImageNet(tmp_path, "validation")
    message = str(missing.value)
    assert isinstance(missing.value, UserError) and isinstance(missing.value, FileNotFoundError)
    for needed in (
        "mini-imagenet-cache-validation.pkl",
        "val_data.hdf5",
        "val_labels.json",
        "miniImageNet_category_split_val.pickle",
        "val.csv + images/*.jpg",
        "docs/data-formats.md",
    ):
        assert needed in message


def test_strict_applies_to_every_format(mini_formats: MiniImageNetFormats) -> None:
    for root in mini_formats.roots.values():
        with pytest.raises(DatasetFileError, match=r"classes instead of 20; .* instead of 600"):
            MiniImageNet(root, "test", cache_dir=False)


# -- the decode cache ---------------------------------------------------------------------------
def test_the_cache_is_a_memory_map_read_back_without_decoding(
    tmp_path: Path,
    mini_formats: MiniImageNetFormats,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache_dir = tmp_path / "cache"
    first = MiniImageNet(mini_formats.roots["ravi"], "train", strict=False, cache_dir=cache_dir)
    assert isinstance(first.images, np.memmap) and not first.images.flags.writeable
    assert first.cache_path is not None and first.cache_path.parent == cache_dir
    import l2l_adversarial.data.mini_imagenet as module

    def no_decoding(*args: object) -> None:
        raise AssertionError("decoded again")

    monkeypatch.setattr(module, "decode_image", no_decoding)
    again = MiniImageNet(mini_formats.roots["ravi"], "train", strict=False, cache_dir=cache_dir)
    np.testing.assert_array_equal(again.images, first.images)
    table = image_table(again)
    assert table is not None and table.images.shape == (20, 3, 84, 84)
    assert table.images.data_ptr() == again.images.ctypes.data  # the map itself, no copy


def _cached(root: Path, cache_dir: Path) -> MiniImageNet:
    return MiniImageNet(root, "test", strict=False, format="learn2learn", cache_dir=cache_dir)


@pytest.mark.parametrize("damage", ["truncate", "alter", "targets", "manifest", "source"])
def test_a_cache_that_does_not_match_is_rebuilt_with_a_warning(
    tmp_path: Path,
    mini_formats: MiniImageNetFormats,
    damage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    source = root / "mini-imagenet-cache-test.pkl"
    source.write_bytes((mini_formats.roots["learn2learn"] / source.name).read_bytes())
    cache_dir = tmp_path / "cache"
    good = np.array(_cached(root, cache_dir).images)
    images = next(cache_dir.glob("*.images.npy"))
    if damage == "truncate":
        truncate_file(images, 0.9)
    elif damage == "alter":
        data = bytearray(images.read_bytes())
        data[-5] ^= 0xFF
        images.write_bytes(bytes(data))
    elif damage == "targets":
        targets = next(cache_dir.glob("*.targets.npy"))
        np.save(targets, np.zeros(20, np.int64))
    elif damage == "manifest":
        next(cache_dir.glob("*.json")).write_text("{not json")
    else:  # the same size, other pixels: the content digest tells
        record = pickle.loads(source.read_bytes())
        record["image_data"] = 255 - record["image_data"]
        stat = source.stat()
        source.write_bytes(pickle.dumps(record, protocol=4))
        assert source.stat().st_size == stat.st_size
    with caplog.at_level(logging.WARNING, logger="l2l_adversarial.data.cache"):
        rebuilt = _cached(root, cache_dir)
    assert "rebuilding the decoded cache" in caplog.text
    expected = 255 - good if damage == "source" else good
    assert sorted(r.tobytes() for r in rebuilt.images) == sorted(r.tobytes() for r in expected)


def test_a_touched_but_unchanged_source_keeps_its_cache(
    tmp_path: Path,
    mini_formats: MiniImageNetFormats,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = mini_formats.roots["metaoptnet"]
    cache_dir = tmp_path / "cache"
    MiniImageNet(root, "test", strict=False, cache_dir=cache_dir)
    source = root / "miniImageNet" / "miniImageNet_category_split_test.pickle"
    os.utime(source, ns=(1, 1))
    with caplog.at_level(logging.WARNING):
        MiniImageNet(root, "test", strict=False, cache_dir=cache_dir)
    assert "rebuilding" not in caplog.text


def test_the_default_cache_sits_beside_the_data(
    tmp_path: Path, mini_formats: MiniImageNetFormats
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    name = "mini-imagenet-cache-test.pkl"
    (root / name).write_bytes((mini_formats.roots["learn2learn"] / name).read_bytes())
    dataset = MiniImageNet(root, "test", strict=False)
    assert dataset.cache_path is not None and dataset.cache_path.parent == root / CACHE_FOLDER


# -- MiniImageNet's bad files ---------------------------------------------------------------------
def test_torchmeta_files_that_disagree_or_are_broken(
    tmp_path: Path, mini_formats: MiniImageNetFormats
) -> None:
    import h5py

    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    source = mini_formats.roots["torchmeta"] / "miniimagenet"
    data, labels = folder / "test_data.hdf5", folder / "test_labels.json"
    data.write_bytes((source / data.name).read_bytes())
    names = json.loads((source / labels.name).read_text())
    labels.write_text(json.dumps(names[:-1] + ["n99999999"]))
    with pytest.raises(DatasetFileError, match="disagree"):
        MiniImageNet(tmp_path, "test", strict=False, cache_dir=False)
    labels.write_text("[1, 2")
    with pytest.raises(DatasetFileError, match="not a JSON list"):
        MiniImageNet(tmp_path, "test", strict=False, cache_dir=False)
    labels.write_text(json.dumps(names))
    truncate_file(data, 0.5)
    with pytest.raises(
        DatasetFileError, match=r"test_data.hdf5.*(not a readable HDF5|cannot be read)"
    ):
        MiniImageNet(tmp_path, "test", strict=False, cache_dir=False)
    with h5py.File(data, "w") as file:
        group = file.create_group("datasets")
        for name in names:
            group.create_dataset(name, data=np.zeros((2, 84, 84, 3), np.float32))
    with pytest.raises(DatasetFileError, match="float32.*expected uint8"):
        MiniImageNet(tmp_path, "test", strict=False, cache_dir=False)
    data.write_bytes(b"")
    with pytest.raises(DatasetFileError, match="not a readable HDF5"):
        MiniImageNet(tmp_path, "test", strict=False, cache_dir=False)


def test_torchmeta_without_h5py_says_how_to_install_it(
    tmp_path: Path,
    mini_formats: MiniImageNetFormats,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(DatasetFileError, match=r"needs h5py.*l2l-adversarial\[hdf5\]"):
        MiniImageNet(mini_formats.roots["torchmeta"], "test", strict=False, cache_dir=False)


def test_metaoptnet_pickles_mislabelled_wrong_or_malicious(tmp_path: Path) -> None:
    path = tmp_path / "miniImageNet_category_split_test.pickle"
    good = {
        "data": np.zeros((4, 84, 84, 3), np.uint8),
        "labels": [0, 0, 1, 1],
        "catname2label": {"n01": 0, "n02": 1},
    }
    dump_python2_pickle({**good, "labels": [0, 0, 1, 2]}, path)
    with pytest.raises(DatasetFileError, match=r"mislabelled: labels \[2\]"):
        MiniImageNet(tmp_path, "test", strict=False, cache_dir=False)
    dump_python2_pickle({**good, "data": np.zeros((4, 84, 84, 3), np.float64)}, path)
    with pytest.raises(DatasetFileError, match="'data' must be a uint8 array"):
        MiniImageNet(tmp_path, "test", strict=False, cache_dir=False)
    dump_python2_pickle({**good, "labels": [0, 1]}, path)
    with pytest.raises(DatasetFileError, match="one integer label per image"):
        MiniImageNet(tmp_path, "test", strict=False, cache_dir=False)
    dump_python2_pickle({"data": good["data"]}, path)
    with pytest.raises(DatasetFileError, match=r"keys \['data', 'labels', 'catname2label'\]"):
        MiniImageNet(tmp_path, "test", strict=False, cache_dir=False)
    marker = tmp_path / "owned"
    write_malicious_pickle(path, marker)
    with pytest.raises(UnsafePickleError, match="os.system|posix.system"):
        MiniImageNet(tmp_path, "test", strict=False, cache_dir=False)
    assert not marker.exists()
    path.write_bytes(b"")
    with pytest.raises(DatasetFileError, match="empty"):
        MiniImageNet(tmp_path, "test", strict=False, cache_dir=False)


def test_ravi_csv_and_images_that_are_missing_unreadable_or_malformed(
    tmp_path: Path,
    mini_formats: MiniImageNetFormats,
) -> None:
    root = tmp_path / "ravi"
    (root / "images").mkdir(parents=True)
    source = mini_formats.roots["ravi"]
    lines = (source / "test.csv").read_text().splitlines()
    (root / "test.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFileError, match=r"lists 20 image\(s\) missing"):
        MiniImageNet(root, "test", strict=False, cache_dir=False)
    for line in lines[1:]:
        name = line.split(",")[0]
        (root / "images" / name).write_bytes((source / "images" / name).read_bytes())
    broken = root / "images" / lines[3].split(",")[0]
    truncate_file(broken, 0.3)
    with pytest.raises(DatasetFileError, match=rf"{broken.name} is not a readable image"):
        MiniImageNet(root, "test", strict=False, cache_dir=False)
    broken.write_text("not an image")
    with pytest.raises(DatasetFileError, match=rf"{broken.name} is not a readable image"):
        MiniImageNet(root, "test", strict=False, cache_dir=False)
    (root / "test.csv").write_text("file,class\nx.jpg,n1\n")
    with pytest.raises(DatasetFileError, match="header 'filename,label'"):
        MiniImageNet(root, "test", strict=False, cache_dir=False)
    (root / "test.csv").write_text("filename,label\n../../etc/passwd,n1\n")
    with pytest.raises(DatasetFileError, match="not a plain file name"):
        MiniImageNet(root, "test", strict=False, cache_dir=False)


# -- CIFAR-FS and FC100 ---------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [CIFARFS, FC100])
def test_cifar_fs_and_fc100_from_metaoptnet_pickles_equal_cifar_100_python(
    tmp_path: Path, cls: type[CIFARFS]
) -> None:
    files = write_cifar100(tmp_path / "torchvision", train_per_class=3, test_per_class=2)
    write_metaoptnet_cifar(tmp_path / "metaoptnet" / cls.FOLDER, files, cls.NAME)
    for mode in ("train", "validation", "test"):
        split = few_shot_cifar_split(cls.NAME)[mode]
        a = cls(tmp_path / "torchvision", mode, strict=False, cache_dir=False)
        b = cls(tmp_path / "metaoptnet", mode, strict=False, cache_dir=False)
        assert (a.format, b.format) == ("cifar-100-python", "metaoptnet")
        assert a.classes == b.classes == split and len(a) == 5 * len(split)
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.targets, b.targets)
        assert_same_tasks(FewShotTasks(a, 5, 1, 3, seed=2), FewShotTasks(b, 5, 1, 3, seed=2))
    with pytest.raises(DatasetFileError, match="classes of 600 images|instead of 600"):
        cls(tmp_path / "metaoptnet", "test", cache_dir=False)


def test_fc100_split_is_by_superclass_and_cifar_fs_matches_the_shipped_split() -> None:
    fc100 = few_shot_cifar_split("fc100")
    assert [len(fc100[mode]) for mode in ("train", "validation", "test")] == [60, 20, 20]
    for names in fc100.values():
        superclasses = {s for s, fine in CIFAR100_SUPERCLASSES.items() if set(fine) & set(names)}
        assert sum(len(CIFAR100_SUPERCLASSES[s]) for s in superclasses) == len(names)
    assert few_shot_cifar_split("cifar-fs") == {
        mode: sorted(names) for mode, names in load_class_split("cifar-fs").items()
    }


def test_metaoptnet_cifar_pickles_of_another_split_are_refused(tmp_path: Path) -> None:
    files = write_cifar100(tmp_path / "torchvision", train_per_class=1, test_per_class=1)
    write_metaoptnet_cifar(tmp_path, files, "cifar-fs")
    (tmp_path / "FC100_test.pickle").write_bytes((tmp_path / "CIFAR_FS_test.pickle").read_bytes())
    with pytest.raises(DatasetFileError, match="mislabelled or of another split"):
        FC100(tmp_path, "test", strict=False, cache_dir=False)
    dump_python2_pickle(
        {"data": np.zeros((2, 32, 32, 3), np.uint8), "labels": [0, 100]},
        tmp_path / "FC100_test.pickle",
    )
    with pytest.raises(DatasetFileError, match=r"fine label ids in \[0, 100\)"):
        FC100(tmp_path, "test", strict=False, cache_dir=False)
    with pytest.raises(DatasetNotFoundError, match="(?s)FC100_val.pickle.*cifar-100-python"):
        FC100(tmp_path / "nothing", "validation")


# -- tieredImageNet -------------------------------------------------------------------------------
@pytest.mark.parametrize("as_arrays", [True, False])
def test_tiered_imagenet_png_pickles_decode_to_the_written_pixels(
    tmp_path: Path, as_arrays: bool
) -> None:
    pixels = write_tiered_imagenet(tmp_path / "tiered-imagenet", "test", as_arrays=as_arrays)
    dataset = TieredImageNet(tmp_path, "test", strict=False)
    assert dataset.format == "png-pickles" and isinstance(dataset.images, np.memmap)
    assert dataset.classes == sorted(dataset.classes) and len(dataset.classes) == 4
    assert sorted(r.tobytes() for r in dataset.images) == sorted(
        r.transpose(2, 0, 1).tobytes() for r in pixels
    )
    assert len(FewShotTasks(dataset, 3, 1, 2, seed=0)[0].query_inputs) == 6
    with pytest.raises(DatasetFileError, match="4 classes instead of 160"):
        TieredImageNet(tmp_path, "test")


def test_tiered_imagenet_bad_files(tmp_path: Path) -> None:
    write_tiered_imagenet(tmp_path, "validation", names=False)
    assert TieredImageNet(tmp_path, "validation", strict=False, cache_dir=False).classes == [
        f"class{c:04d}" for c in range(4)
    ]
    write_tiered_imagenet(tmp_path, "train", num_classes=3)
    (tmp_path / "val_labels.pkl").write_bytes((tmp_path / "train_labels.pkl").read_bytes())
    with pytest.raises(DatasetFileError, match="different splits or copies"):
        TieredImageNet(tmp_path, "validation", strict=False, cache_dir=False)
    images = [b"\x89PNG\r\n\x1a\n broken"] * 9
    dump_python2_pickle(images, tmp_path / "train_images_png.pkl")
    with pytest.raises(DatasetFileError, match="train_images_png.pkl image 0 is not a readable"):
        TieredImageNet(tmp_path, "train", strict=False, cache_dir=False)
    write_malicious_pickle(tmp_path / "test_images_png.pkl", tmp_path / "owned", "builtins.exec")
    write_tiered_imagenet(tmp_path / "x", "test")
    (tmp_path / "test_labels.pkl").write_bytes((tmp_path / "x" / "test_labels.pkl").read_bytes())
    with pytest.raises(UnsafePickleError):
        TieredImageNet(tmp_path, "test", strict=False, cache_dir=False)
    assert not (tmp_path / "owned").exists()
    with pytest.raises(DatasetNotFoundError, match="train_images_png.pkl"):
        TieredImageNet(tmp_path / "empty", "train")


# -- Omniglot -------------------------------------------------------------------------------------
def test_omniglot_splits_all_characters_and_rotations_add_classes(tmp_path: Path) -> None:
    write_omniglot(tmp_path, alphabets=(3, 2), characters=4, drawers=3)  # 20 characters
    splits = {
        m: Omniglot(tmp_path, m, strict=False, cache_dir=False)
        for m in ("train", "validation", "test")
    }
    sizes = {m: len(d.classes) for m, d in splits.items()}
    assert sizes == {"train": 14, "validation": 1, "test": 5}  # 1100 / 100 / 423 of 1623
    every = [name for d in splits.values() for name in d.classes]
    assert len(set(every)) == 20 and all(name.count("/") == 1 for name in every)
    train = splits["train"]
    assert train.images.shape == (42, 1, 28, 28) and train[0][0].shape == (1, 28, 28)
    rotated = Omniglot(tmp_path, "train", strict=False, rotations=True)
    assert len(rotated.classes) == 56 and rotated.classes[1].endswith("@rot090")
    first = rotated.images[rotated.targets == 0]
    np.testing.assert_array_equal(
        rotated.images[rotated.targets == 1], np.rot90(first, 1, axes=(2, 3))
    )
    np.testing.assert_array_equal(first, train.images[train.targets == 0])
    assert_same_tasks(
        FewShotTasks(rotated, 5, 1, 2, seed=1), FewShotTasks(rotated, 5, 1, 2, seed=1)
    )
    with pytest.raises(DatasetFileError, match="20 characters, not 1623"):
        Omniglot(tmp_path, "train")
    with pytest.raises(DatasetNotFoundError, match="images_background"):
        Omniglot(tmp_path / "none", "train")


# -- image folders --------------------------------------------------------------------------------
def test_image_folder_ratio_split_resizes_and_ignores_other_files(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "mine", classes=6, per_class=4, size=40)
    parts = {
        m: ImageFolderSplit(root, m, image_size=16, split_ratio=(0.5, 0.17, 0.33), split_seed=3)
        for m in ("train", "validation", "test")
    }
    assert [len(p.classes) for p in parts.values()] == [3, 1, 2]
    assert sorted(sum((p.classes for p in parts.values()), [])) == [
        f"class_{i:02d}" for i in range(6)
    ]
    assert parts["train"].images.shape == (12, 3, 16, 16)
    again = ImageFolderSplit(
        root, "train", image_size=16, split_ratio=(0.5, 0.17, 0.33), split_seed=3
    )
    assert again.classes == parts["train"].classes
    other = ImageFolderSplit(
        root, "train", image_size=16, split_ratio=(0.5, 0.17, 0.33), split_seed=4
    )
    assert other.cache_path != parts["train"].cache_path  # each split its own cache
    grey = ImageFolderSplit(root, "test", image_size=8, channels=1, split_ratio=(0.5, 0.17, 0.33))
    assert grey[0][0].shape == (1, 8, 8)


def test_image_folder_split_file_json_or_yaml(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "mine", classes=4, per_class=3)
    split = {"train": ["class_00", "class_01"], "validation": ["class_02"], "test": ["class_03"]}
    (tmp_path / "split.json").write_text(json.dumps(split))
    (tmp_path / "split.yaml").write_text(
        "train: [class_00, class_01]\nvalidation: [class_02]\ntest: [class_03]\n"
    )
    for name in ("split.json", "split.yaml"):
        test = ImageFolderSplit(
            root, "test", image_size=20, split_file=tmp_path / name, cache_dir=False
        )
        assert test.classes == ["class_03"] and len(test) == 3
    (tmp_path / "bad.json").write_text(
        json.dumps({"train": ["class_00", "nope"], "test": ["class_00"]})
    )
    with pytest.raises(DatasetFileError, match=r"in two splits"):
        ImageFolderSplit(root, "train", split_file=tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"train": ["nope"]}))
    with pytest.raises(DatasetFileError, match=r"\['nope'\] have no folder"):
        ImageFolderSplit(root, "train", split_file=tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({"train": ["class_00"]}))
    with pytest.raises(DatasetFileError, match="leaves no class for validation"):
        ImageFolderSplit(root, "validation", split_file=tmp_path / "bad.json")
    with pytest.raises(DatasetFileError, match="does not exist"):
        ImageFolderSplit(root, "train", split_file=tmp_path / "absent.yaml")


def test_image_folder_names_every_unreadable_file(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "mine", classes=2, per_class=3)
    broken = [root / "class_00" / "image_000.jpg", root / "class_01" / "image_004.jpg"]
    broken[0].write_bytes(b"")
    truncate_file(root / "class_01" / "image_004.JPG", 0.4)
    (root / "class_01" / "image_004.JPG").rename(broken[1])
    split = {"train": ["class_00", "class_01"]}
    (tmp_path / "s.json").write_text(json.dumps(split))
    with pytest.raises(DatasetFileError, match="2 image file") as error:
        ImageFolderSplit(root, "train", split_file=tmp_path / "s.json")
    assert all(str(path) in str(error.value) for path in broken)
    assert "docs/data-formats.md" in str(error.value)
    assert not list((root / CACHE_FOLDER).glob("*.json"))  # no cache left behind
    with pytest.raises(DatasetNotFoundError, match="no class subfolders"):
        ImageFolderSplit(root / "class_00", "train")


# -- the config keys ------------------------------------------------------------------------------
def test_config_dataset_keys_are_checked_against_the_registry(tmp_path: Path) -> None:
    from l2l_adversarial.app.config import DATASETS, ConfigError, load_config
    from l2l_adversarial.app.factory import DATASET_TITLES
    from l2l_adversarial.data import DATASET_INFO

    assert DATASETS == tuple(DATASET_INFO) and set(DATASET_TITLES) == set(DATASET_INFO)
    root = f"dataset.root={tmp_path}"
    config = load_config(
        None, ["dataset.name=image-folder", root, "dataset.split_ratio=[0.5,0.25,0.25]"]
    )
    assert config["dataset"]["split_ratio"] == [0.5, 0.25, 0.25]
    assert load_config(None, ["dataset.name=mini-imagenet", root, "dataset.format=ravi"])
    for overrides, message in (
        (["dataset.name=mini-imagenet", "dataset.format=hdf5"], "not a format of 'mini-imagenet'"),
        (
            ["dataset.name=image-folder", "dataset.rotations=true"],
            "rotations applies to omniglot only",
        ),
        (["dataset.name=cifar-fs", "dataset.image_size=28"], "image_size applies to"),
        (["dataset.name=omniglot", "dataset.format=ravi"], "format applies to mini-imagenet"),
        (["dataset.name=tiered-imagenet", "dataset.download=true"], "cannot be downloaded"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [*overrides, root])
    with pytest.raises(ConfigError, match="unallowed value"):
        load_config(None, ["dataset.name=imagefolder", root])


def test_fc100_downloads_cifar_100_with_torchvision_only_when_nothing_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets

    calls: list[str] = []

    class FakeCIFAR100:
        def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
            calls.append(root)
            write_cifar100(root, train_per_class=2, test_per_class=1)

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", FakeCIFAR100)
    test = FC100(tmp_path / "data", "test", download=True, strict=False)
    assert test.format == "cifar-100-python" and len(test) == 20 * 3 and len(calls) == 1
    FC100(tmp_path / "data", "validation", download=True, strict=False)
    assert len(calls) == 1


def test_a_pickled_split_maps_its_cache_again(tmp_path: Path) -> None:
    write_tiered_imagenet(tmp_path, "test")
    dataset = TieredImageNet(tmp_path, "test", strict=False)
    data = pickle.dumps(dataset)
    assert len(data) < dataset.images.nbytes / 4  # the images are not in the pickle
    copy = pickle.loads(data)
    assert isinstance(copy.images, np.memmap) and copy.classes == dataset.classes
    np.testing.assert_array_equal(copy.images, dataset.images)
    in_memory = TieredImageNet(tmp_path, "test", strict=False, cache_dir=False)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(in_memory)).images, dataset.images)


def test_a_read_only_root_puts_the_cache_in_the_user_cache_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from l2l_adversarial.data import cache

    root = tmp_path / "read-only"
    root.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(cache.os, "access", lambda path, mode: Path(path) != root)
    folder = cache.cache_folder(root, None)
    assert folder is not None and folder.parent == tmp_path / "xdg" / "l2l-adversarial"
    assert cache.cache_folder(root, False) is None
    assert cache.cache_folder(root, tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.undo()
    assert cache.cache_folder(root, None) == root / CACHE_FOLDER
