"""MiniImageNet from any of its four common formats, decoded once into a memory-mapped cache.

Formats (``format=``; ``"auto"`` tries them in this order):

- ``"learn2learn"``: ``root/mini-imagenet-cache-{train,validation,test}.pkl`` (dicts with
  ``image_data`` N x 84 x 84 x 3 uint8 and ``class_dict`` {class: rows}); downloadable.
- ``"torchmeta"``: ``{train,val,test}_data.hdf5`` (group ``datasets``, one N x 84 x 84 x 3
  uint8 dataset per class) and ``{train,val,test}_labels.json`` (the class names), in
  ``root`` or ``root/miniimagenet``; needs h5py (``pip install 'l2l-adversarial[hdf5]'``).
- ``"metaoptnet"``: ``miniImageNet_category_split_{train_phase_train,val,test}.pickle``
  (Python 2 pickles: ``data`` N x 84 x 84 x 3 uint8, ``labels``, ``catname2label``), in
  ``root`` or ``root/miniImageNet``.
- ``"ravi"``: Ravi & Larochelle's ``{train,val,test}.csv`` (``filename,label``) and
  ``images/<filename>`` (JPEG), in ``root`` or ``root/mini-imagenet``; decoded by Pillow
  (:data:`~l2l_adversarial.data._decode.DECODER`), resized to 84 x 84 with Lanczos when not.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from learn2learn.data import utils as l2l_data_utils

from l2l_adversarial.data._decode import decode_image
from l2l_adversarial.data._images import MODES, check_mode, check_uint8_rows, is_data_file
from l2l_adversarial.data.cache import Plan
from l2l_adversarial.data.errors import DatasetDownloadError, DatasetFileError
from l2l_adversarial.data.safe_pickle import python2_text, safe_load
from l2l_adversarial.data.split import GUIDE, Format, StandardSplit

__all__ = ["MiniImageNet", "open_hdf5"]

_log = logging.getLogger(__name__)
# Mirrors of learn2learn 0.2.0's MiniImagenet (learn2learn/vision/datasets/mini_imagenet.py).
_MIRRORS: dict[str, tuple[str, ...]] = {
    mode: (
        f"https://zenodo.org/record/7978538/files/mini-imagenet-cache-{mode}.pkl",
        dropbox,
    )
    for mode, dropbox in (
        ("train", "https://www.dropbox.com/s/9g8c6w345s2ek03/mini-imagenet-cache-train.pkl?dl=1"),
        (
            "validation",
            "https://www.dropbox.com/s/ip1b7se3gij3r1b/mini-imagenet-cache-validation.pkl?dl=1",
        ),
        ("test", "https://www.dropbox.com/s/ye9jeb5tyz0x01b/mini-imagenet-cache-test.pkl?dl=1"),
    )
}


def _how_to_obtain(path: Path, mode: str) -> str:
    return (
        f"Expected learn2learn's mini-ImageNet cache at {path} (layout: root/"
        "mini-imagenet-cache-train.pkl, root/mini-imagenet-cache-validation.pkl, root/"
        "mini-imagenet-cache-test.pkl). Get it with MiniImageNet(root, mode="
        f"{mode!r}, download=True) or download {_MIRRORS[mode][0]} into that directory."
    )


_SPLIT_NAMES = {"train": "train", "validation": "val", "test": "test"}
_METAOPTNET_SPLITS = {"train": "train_phase_train", "validation": "val", "test": "test"}
_SIZE = 84


def _first_dir(
    root: Path, subfolders: tuple[str, ...], needed: Callable[[Path], bool]
) -> Path | None:
    for folder in (root, *(root / name for name in subfolders)):
        if needed(folder):
            return folder
    return None


# -- learn2learn's pickles ----------------------------------------------------------------------
def _l2l_locate(root: Path, mode: str) -> list[Path] | None:
    path = MiniImageNet.file_path(root, mode)
    return [path] if is_data_file(path) else None


def _l2l_expected(root: Path, mode: str) -> str:
    return _how_to_obtain(MiniImageNet.file_path(root, mode), mode)


def _l2l_plan(root: Path, mode: str, sources: list[Path], options: dict[str, Any]) -> Plan:
    images, targets, classes = _read_cache(sources[0], mode, strict=False)
    return Plan(
        names=[classes[label] for label in targets.tolist()],
        shape=(3, *images.shape[1:3]),
        items=(image.transpose(2, 0, 1) for image in images),
        what=f"decoding mini-ImageNet {mode} (learn2learn)",
    )


# -- torchmeta's hdf5 ---------------------------------------------------------------------------
def _torchmeta_files(folder: Path, mode: str) -> tuple[Path, Path]:
    split = _SPLIT_NAMES[mode]
    return folder / f"{split}_data.hdf5", folder / f"{split}_labels.json"


def _torchmeta_locate(root: Path, mode: str) -> list[Path] | None:
    folder = _first_dir(
        root, ("miniimagenet",), lambda d: all(map(is_data_file, _torchmeta_files(d, mode)))
    )
    return None if folder is None else list(_torchmeta_files(folder, mode))


def _torchmeta_expected(root: Path, mode: str) -> str:
    data, labels = _torchmeta_files(root, mode)
    return (
        f"torchmeta's {data.name} + {labels.name} in {root} or {root / 'miniimagenet'} "
        "(written by torchmeta.datasets.MiniImagenet(download=True))"
    )


def open_hdf5(path: Path, hint: str) -> Any:
    """``h5py.File(path, "r")``: read-only, with a clear error when h5py is missing or the file
    is not HDF5."""
    try:
        import h5py
    except ImportError as err:
        raise DatasetFileError(
            f"reading {path} (HDF5) needs h5py, which is not installed; install it with "
            "pip install 'l2l-adversarial[hdf5]' (or pip install h5py), or use another format "
            f"of the dataset ({GUIDE})"
        ) from err
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DatasetFileError(
            f"{path} is not a readable HDF5 file ({err}): truncated, empty or another kind of "
            f"file. Delete it and obtain it again. {hint}"
        ) from err


def _torchmeta_labels(labels_path: Path, hint: str) -> list[str]:
    """The class names of torchmeta's ``{split}_labels.json``, checked."""
    try:
        labels = json.loads(labels_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetFileError(
            f"{labels_path} is not a JSON list of class names ({err}). {hint}"
        ) from err
    if not (isinstance(labels, list) and labels and all(isinstance(n, str) for n in labels)):
        raise DatasetFileError(
            f"{labels_path} must be a non-empty JSON list of class names. {hint}"
        )
    return labels


def _torchmeta_plan(root: Path, mode: str, sources: list[Path], options: dict[str, Any]) -> Plan:
    data_path, labels_path = sources
    hint = f"Regenerate it with torchmeta's MiniImagenet(download=True); see {GUIDE}."
    labels = _torchmeta_labels(labels_path, hint)
    file = open_hdf5(data_path, hint)
    group = file.get("datasets")
    if group is None or not hasattr(group, "keys"):
        file.close()
        raise DatasetFileError(
            f"{data_path} has no group 'datasets' (found {sorted(file.keys())}). {hint}"
        )
    if sorted(group.keys()) != sorted(labels) or len(set(labels)) != len(labels):
        found = sorted(group.keys())
        file.close()
        raise DatasetFileError(
            f"{data_path} and {labels_path} disagree: the HDF5 file holds classes {found[:5]}... "
            f"({len(found)}), the JSON lists {sorted(labels)[:5]}... ({len(labels)}): the files "
            f"come from different splits or copies. {hint}"
        )
    names: list[str] = []
    shape: tuple[int, ...] | None = None
    for name in labels:
        dataset = group[name]
        dtype, found = dataset.dtype, dataset.shape
        if dtype != np.uint8 or len(found) != 4 or found[3] != 3:
            file.close()
            raise DatasetFileError(
                f"{data_path}: class {name} is {dtype} {found}, expected uint8 (N, H, W, 3). {hint}"
            )
        if shape is not None and found[1:] != shape:
            file.close()
            raise DatasetFileError(
                f"{data_path}: class {name} has images of {found[1:]}, others {shape}. {hint}"
            )
        shape = found[1:]
        names += [name] * found[0]
    assert shape is not None

    def items() -> Iterator[np.ndarray]:
        with file:
            for name in labels:
                dataset = group[name]
                for start in range(0, dataset.shape[0], 256):
                    try:
                        chunk = dataset[start : start + 256]
                    except OSError as err:
                        raise DatasetFileError(
                            f"{data_path}: class {name} cannot be read ({err}): the file is "
                            f"truncated or damaged. {hint}"
                        ) from err
                    yield from chunk.transpose(0, 3, 1, 2)

    return Plan(
        names, (3, shape[0], shape[1]), items(), f"decoding mini-ImageNet {mode} (torchmeta)"
    )


# -- MetaOptNet's pickles -----------------------------------------------------------------------
def _metaoptnet_name(mode: str) -> str:
    return f"miniImageNet_category_split_{_METAOPTNET_SPLITS[mode]}.pickle"


def _metaoptnet_locate(root: Path, mode: str) -> list[Path] | None:
    name = _metaoptnet_name(mode)
    folder = _first_dir(root, ("miniImageNet",), lambda d: is_data_file(d / name))
    return None if folder is None else [folder / name]


def _metaoptnet_expected(root: Path, mode: str) -> str:
    return f"MetaOptNet's {_metaoptnet_name(mode)} in {root} or {root / 'miniImageNet'}"


def metaoptnet_record(
    path: Path, keys: tuple[str, ...], hint: str
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read a MetaOptNet pickle (Python 2; its byte strings as latin-1 text): (data
    N x H x W x 3 uint8, int labels, the whole record)."""
    record = python2_text(safe_load(path, encoding="bytes", how_to_obtain=hint))
    if not isinstance(record, dict) or not set(keys) <= set(record):
        found = sorted(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise DatasetFileError(
            f"{path} should be a dict with keys {list(keys)}, found {found}. {hint}"
        )
    data, labels = record["data"], np.asarray(record["labels"])
    check_uint8_rows(data, ("N", "H", "W", 3), str(path), hint)
    if labels.shape != (len(data),) or labels.dtype.kind not in "iu":
        raise DatasetFileError(
            f"{path}: 'labels' must give one integer label per image ({len(data)} images), got "
            f"dtype {labels.dtype} shape {labels.shape}. {hint}"
        )
    return data, labels.astype(np.int64), record


def _metaoptnet_plan(root: Path, mode: str, sources: list[Path], options: dict[str, Any]) -> Plan:
    path = sources[0]
    hint = f"Obtain it again from MetaOptNet's data release; see {GUIDE}."
    data, labels, record = metaoptnet_record(path, ("data", "labels", "catname2label"), hint)
    catname2label = record["catname2label"]
    if not isinstance(catname2label, dict) or not all(isinstance(n, str) for n in catname2label):
        raise DatasetFileError(f"{path}: 'catname2label' must map class names to labels. {hint}")
    name_of = {int(label): name for name, label in catname2label.items()}
    unknown = sorted(set(labels.tolist()) - set(name_of))
    if unknown or len(name_of) != len(catname2label):
        raise DatasetFileError(
            f"{path} is mislabelled: labels {unknown[:10]} have no name in 'catname2label' (or "
            f"two names share a label). {hint}"
        )
    return Plan(
        names=[name_of[label] for label in labels.tolist()],
        shape=(3, *data.shape[1:3]),
        items=(image.transpose(2, 0, 1) for image in data),
        what=f"decoding mini-ImageNet {mode} (metaoptnet)",
    )


# -- Ravi & Larochelle's csv + JPEG images ------------------------------------------------------
def _ravi_locate(root: Path, mode: str) -> list[Path] | None:
    csv_name = f"{_SPLIT_NAMES[mode]}.csv"
    folder = _first_dir(
        root,
        ("mini-imagenet", "miniImagenet"),
        lambda d: is_data_file(d / csv_name) and (d / "images").is_dir(),
    )
    if folder is None:
        return None
    listed = _ravi_rows(folder / csv_name)
    missing = [name for name, _ in listed if not (folder / "images" / name).is_file()]
    if missing:
        raise DatasetFileError(
            f"{folder / csv_name} lists {len(missing)} image(s) missing from {folder / 'images'} "
            f"(first: {missing[:3]}): the images folder is incomplete. Extract all of "
            f"Ravi & Larochelle's images into it; see {GUIDE}."
        )
    return [folder / csv_name] + [folder / "images" / name for name, _ in listed]


def _ravi_rows(path: Path) -> list[tuple[str, str]]:
    hint = f"Expected Ravi & Larochelle's split file: a header 'filename,label' and one row per image; see {GUIDE}."
    try:
        with path.open(newline="", encoding="utf-8") as file:
            rows = list(csv.reader(file))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DatasetFileError(f"{path} is not a CSV file ({err}). {hint}") from err
    if not rows or [cell.strip() for cell in rows[0]] != ["filename", "label"]:
        raise DatasetFileError(f"{path} does not start with the header 'filename,label'. {hint}")
    bad = [number for number, row in enumerate(rows[1:], 2) if len(row) != 2 or not all(row)]
    if bad or len(rows) < 2:
        raise DatasetFileError(
            f"{path}: rows {bad[:5]} do not hold a file name and a label"
            if bad
            else f"{path} lists no image. {hint}"
        )
    for name, _ in rows[1:]:
        if Path(name).name != name:
            raise DatasetFileError(f"{path} lists {name!r}, which is not a plain file name. {hint}")
    return [(name, label) for name, label in rows[1:]]


def _ravi_expected(root: Path, mode: str) -> str:
    csv_name = f"{_SPLIT_NAMES[mode]}.csv"
    return (
        f"Ravi & Larochelle's {csv_name} + images/*.jpg in {root}, {root / 'mini-imagenet'} or "
        f"{root / 'miniImagenet'}"
    )


def _ravi_plan(root: Path, mode: str, sources: list[Path], options: dict[str, Any]) -> Plan:
    rows = _ravi_rows(sources[0])
    hint = f"Obtain the image again (Ravi & Larochelle's images folder); see {GUIDE}."
    return Plan(
        names=[label for _, label in rows],
        shape=(3, _SIZE, _SIZE),
        items=(
            decode_image(path, size=(_SIZE, _SIZE), where=str(path), hint=hint)
            for path in sources[1:]
        ),
        what=f"decoding mini-ImageNet {mode} (ravi: JPEG)",
    )


_FORMATS = (
    Format("learn2learn", _l2l_locate, _l2l_expected, _l2l_plan),
    Format("torchmeta", _torchmeta_locate, _torchmeta_expected, _torchmeta_plan),
    Format("metaoptnet", _metaoptnet_locate, _metaoptnet_expected, _metaoptnet_plan),
    Format("ravi", _ravi_locate, _ravi_expected, _ravi_plan),
)


class MiniImageNet(StandardSplit):
    """MiniImageNet (Vinyals et al. 2016; Ravi & Larochelle split) as ``(image, label)`` pairs.

    Reads any of the four formats of the module doc from ``root`` (``format="auto"``) or the
    one named, and decodes it once into a uint8 3 x 84 x 84 cache that is memory-mapped on
    every later load (``cache_dir``: see :func:`~l2l_adversarial.data.cache.cache_folder`;
    ``False`` decodes into memory). Each item is a new float tensor of shape 3 x 84 x 84 in
    [0, 1], then passed through ``transform``. Every format holding the same pixels gives the
    same rows, so the same tasks for the same seed (row order: :mod:`~l2l_adversarial.data.cache`).

    Labels: the mode's class names (WordNet ids such as ``n01532829``) sorted by name are
    labels 0..C-1; ``classes[label]`` is the name and ``targets[i]`` the label of row i.

    ``strict=True`` (default) also requires the standard sizes: 84 x 84 images and 64 / 16 /
    20 classes of 600 images for train / validation / test. ``strict=False`` accepts any
    number of classes and images per class and any image size (small or home-made caches).

    ``download=True`` fetches learn2learn's file when no format is found (zenodo, then
    dropbox mirror), checks it and only then moves it into place; a failed download leaves
    no file behind and raises :class:`DatasetDownloadError`.

    Example::

        train = MiniImageNet("~/data", mode="train", download=True)
        image, label = train[0]  # image: float32 (3, 84, 84) in [0, 1]
    """

    NAME = "mini-imagenet"
    FORMATS = _FORMATS
    STANDARD_CLASSES = {"train": 64, "validation": 16, "test": 20}
    IMAGES_PER_CLASS = 600
    IMAGE_SHAPE = (3, 84, 84)
    DOWNLOAD_FORMAT = "learn2learn"

    @classmethod
    def fetch(cls, folder: Path, mode: str, strict: bool) -> None:
        """Download learn2learn's cache of ``mode`` into ``folder``."""
        _download(cls.file_path(folder, mode), mode, strict)

    @staticmethod
    def file_path(root: str | os.PathLike[str], mode: str) -> Path:
        """Where learn2learn's cache of ``mode`` lives: ``root/mini-imagenet-cache-{mode}.pkl``."""
        check_mode(mode)
        return Path(root).expanduser() / f"mini-imagenet-cache-{mode}.pkl"


def _read_cache(path: Path, mode: str, strict: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Load and check one cache file; return (images, targets, sorted class names)."""
    hint = _how_to_obtain(path, mode)
    data: Any = safe_load(path, how_to_obtain=hint)

    def bad(problem: str) -> DatasetFileError:
        return DatasetFileError(
            f"{path} is not a valid mini-ImageNet {mode} cache: {problem}. {hint}"
        )

    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= data.keys():
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise bad(f"expected a dict with keys 'image_data' and 'class_dict', found {found}")
    images, class_dict = data["image_data"], data["class_dict"]
    if not (
        isinstance(images, np.ndarray)
        and images.dtype == np.uint8
        and images.ndim == 4
        and images.shape[3] == 3
    ):
        shape = getattr(images, "shape", None)
        raise bad(
            f"'image_data' must be a uint8 array of shape (N, H, W, 3), got "
            f"{type(images).__name__} dtype={getattr(images, 'dtype', None)} shape={shape}"
        )
    if strict and images.shape[1:] != (84, 84, 3):
        raise bad(
            f"images are {images.shape[1:]} but standard mini-ImageNet images are 84 x 84 x 3 "
            "(pass strict=False to accept other sizes)"
        )
    if not isinstance(class_dict, dict) or not class_dict:
        raise bad("'class_dict' must be a non-empty dict {class name: list of row indices}")
    if not all(isinstance(name, str) for name in class_dict):
        raise bad("'class_dict' keys must be class names (str)")
    classes = sorted(class_dict)
    targets = np.full(len(images), -1, dtype=np.int64)
    for label, name in enumerate(classes):
        rows = np.asarray(class_dict[name])
        if rows.ndim != 1 or rows.dtype.kind not in "iu":
            raise bad(f"class {name!r} must list integer row indices")
        if rows.size and (rows.min() < 0 or rows.max() >= len(images)):
            raise bad(f"class {name!r} lists rows outside [0, {len(images)})")
        if np.unique(rows).size != rows.size or (targets[rows] != -1).any():
            raise bad(f"class {name!r} lists a row more than once or a row of another class")
        targets[rows] = label
    if (targets == -1).any():
        raise bad(f"{int((targets == -1).sum())} image rows belong to no class")
    if strict:
        counts = np.bincount(targets, minlength=len(classes))
        expected = MiniImageNet.STANDARD_CLASSES[mode]
        if len(classes) != expected or (counts != MiniImageNet.IMAGES_PER_CLASS).any():
            raise bad(
                f"expected {expected} classes of {MiniImageNet.IMAGES_PER_CLASS} images for "
                f"mode {mode!r}, found {len(classes)} classes with {np.min(counts)} to "
                f"{np.max(counts)} images (pass strict=False to accept a non-standard cache)"
            )
    images.setflags(write=False)
    targets.setflags(write=False)
    return images, targets, classes


def _download(path: Path, mode: str, strict: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Try each mirror into a temporary file; move it to ``path`` only once it loads."""
    path.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in _MIRRORS[mode]:
        handle, temporary = tempfile.mkstemp(
            dir=path.parent, prefix=f".{path.name}.", suffix=".part"
        )
        os.close(handle)
        partial = Path(temporary)
        try:
            _log.info("downloading mini-ImageNet %s from %s", mode, url)
            l2l_data_utils.download_file(url, str(partial))
            cache = _read_cache(partial, mode, strict)
            os.replace(partial, path)
            return cache
        except Exception as err:  # any failure of this mirror: try the next one
            failures.append(f"{url}: {type(err).__name__}: {err}")
        finally:
            partial.unlink(missing_ok=True)
    raise DatasetDownloadError(
        f"Could not download mini-ImageNet {mode} to {path}; no file was left behind. "
        "Tried:\n  " + "\n  ".join(failures) + f"\nDownload it by hand into {path.parent} "
        f"(one of the URLs above) and load it with download=False. Modes: {', '.join(MODES)}."
    )
