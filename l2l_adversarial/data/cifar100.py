"""CIFAR-100 as a few-shot benchmark: 100 classes of 600 images split 64 / 16 / 20.

The ADML paper (Yin et al., Sec. 4.1) built a "meta-learning version of CIFAR100 ... with the
same settings as MiniImageNet" without publishing its class split. ``split="paper"`` is this
project's fixed random 64 / 16 / 20 split (``resources/cifar100-paper-split.json``), made by
:func:`random_class_split` with ``seed=PAPER_SPLIT_SEED``. ``split="cifar-fs"`` is the
CIFAR-FS split of Bertinetto et al. 2019 (``resources/cifar-fs-split.json``, source recorded
in the file: bertinetto/r2d2's split files as published in torchmeta's assets).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torchvision.datasets
from torch import Tensor
from torch.utils.data import Dataset

from l2l_adversarial.data._images import (
    MODES,
    UInt8Items,
    as_root,
    check_mode,
    check_uint8_rows,
    is_data_file,
)
from l2l_adversarial.data.errors import DatasetDownloadError, DatasetFileError
from l2l_adversarial.data.safe_pickle import safe_load
from l2l_adversarial.validation import check_choice

__all__ = [
    "CIFAR100Meta",
    "PAPER_SPLIT_SEED",
    "SPLITS",
    "load_class_split",
    "random_class_split",
]

_log = logging.getLogger(__name__)

_SPLIT_FILES = {"paper": "cifar100-paper-split.json", "cifar-fs": "cifar-fs-split.json"}
#: Names accepted by ``CIFAR100Meta(split=...)`` and :func:`load_class_split`.
SPLITS = tuple(_SPLIT_FILES)
#: Seed that made the shipped ``paper`` split with :func:`random_class_split`.
PAPER_SPLIT_SEED = 0
_SPLIT_SIZES = {"train": 64, "validation": 16, "test": 20}

_FOLDER = "cifar-100-python"
_FILES = ("train", "test", "meta")
_URL = torchvision.datasets.CIFAR100.url


def load_class_split(split: str = "paper") -> dict[str, list[str]]:
    """The shipped class split: ``{"train": [64 names], "validation": [16], "test": [20]}``.

    Example::

        load_class_split("cifar-fs")["test"][:3]  # ['baby', 'bed', 'bicycle']
    """
    check_choice("split", split, SPLITS)
    text = resources.files("l2l_adversarial.data") / "resources" / _SPLIT_FILES[split]
    document = json.loads(text.read_text(encoding="utf-8"))
    return {mode: list(document[mode]) for mode in MODES}


def random_class_split(
    class_names: Iterable[str], seed: int, sizes: dict[str, int] | None = None
) -> dict[str, list[str]]:
    """Split classes at random: the rule that made the shipped ``paper`` split.

    Rule: sort the names, permute them with ``numpy.random.default_rng(seed).permutation``,
    give the first ``sizes["train"]`` to train, the next ``sizes["validation"]`` to
    validation and the rest to test; sort each part by name. ``sizes`` defaults to 64 / 16 / 20.

    Example::

        names = load_class_split("cifar-fs")  # any 100 names
        split = random_class_split(sum(names.values(), []), seed=PAPER_SPLIT_SEED)
    """
    names = sorted(class_names)
    sizes = dict(_SPLIT_SIZES if sizes is None else sizes)
    if set(sizes) != set(MODES) or any(size < 0 for size in sizes.values()):
        raise ValueError(f"sizes must give a non-negative size for each of {MODES}, got {sizes}")
    if len(set(names)) != len(names) or len(names) != sum(sizes.values()):
        raise ValueError(
            f"class_names must hold {sum(sizes.values())} distinct names for sizes {sizes}; got "
            f"{len(names)} names ({len(set(names))} distinct)"
        )
    order = np.random.default_rng(seed).permutation(len(names))
    split, start = {}, 0
    for mode in MODES:
        split[mode] = sorted(names[i] for i in order[start : start + sizes[mode]])
        start += sizes[mode]
    return split


def _how_to_obtain(root: Path) -> str:
    return (
        f"Expected torchvision's CIFAR-100 python files at {root / _FOLDER}/{{train,test,meta}}. "
        "Get them with CIFAR100Meta(root, download=True) (torchvision's CIFAR100 downloader) or "
        f"download {_URL} and extract it into {root}."
    )


class CIFAR100Meta(UInt8Items, Dataset[tuple[Tensor, int]]):
    """One meta-split of CIFAR-100 (train and test files merged: 600 images per class).

    Reads torchvision's CIFAR-100 python files ``root/cifar-100-python/{train,test,meta}``
    (Python 2 pickles, read without running code) and keeps the classes that ``split``
    assigns to ``mode``. Images stay uint8 in memory (read-only, 3 x 32 x 32 each); every
    item is a new float tensor in [0, 1], then passed through ``transform``.

    Labels: the mode's fine-label names sorted by name are labels 0..C-1; ``classes[label]``
    is the name and ``targets[i]`` the label of image i (train-file images first, then
    test-file images, each in file order).

    ``strict=True`` (default) requires the standard files: 50000 train and 10000 test images,
    600 per class. ``strict=False`` accepts any number of images (small test files).
    ``download=True`` fetches missing files with ``torchvision.datasets.CIFAR100`` into a
    temporary folder and moves them into place only when complete.

    Example::

        test = CIFAR100Meta("~/data", mode="test", split="paper", download=True)
        image, label = test[0]  # float32 (3, 32, 32); label in [0, 20)
    """

    NAME = "cifar100"
    STANDARD_IMAGES = {"train": 50000, "test": 10000}
    IMAGES_PER_CLASS = 600

    def __init__(
        self,
        root: str | os.PathLike[str],
        mode: str = "train",
        split: str = "paper",
        transform: Callable[[Tensor], Tensor] | None = None,
        download: bool = False,
        strict: bool = True,
    ) -> None:
        check_mode(mode)
        check_choice("split", split, SPLITS)
        self.root = as_root(root, "CIFAR-100")
        self.mode = mode
        self.split = split
        self.transform = transform
        self.strict = strict
        folder = self.root / _FOLDER
        missing = [name for name in _FILES if not is_data_file(folder / name)]
        if missing and download:
            _download(self.root)
        elif missing:
            raise FileNotFoundError(
                f"CIFAR-100 file(s) {', '.join(missing)} not found in {folder}. "
                + _how_to_obtain(self.root)
            )
        images, fine_labels, names = _read_cifar100(self.root, strict)
        wanted = load_class_split(split)[mode]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise DatasetFileError(
                f"{folder / 'meta'} lacks the CIFAR-100 classes {unknown} of split {split!r}: "
                f"it is not CIFAR-100's meta file. {_how_to_obtain(self.root)}"
            )
        #: class names; ``classes[label]`` names a label.
        self.classes: list[str] = sorted(wanted)
        self.class_to_idx = {name: label for label, name in enumerate(self.classes)}
        label_of_fine = np.full(len(names), -1, dtype=np.int64)
        for label, name in enumerate(self.classes):
            label_of_fine[names.index(name)] = label
        keep = label_of_fine[fine_labels] >= 0
        #: uint8 array (N, 3, 32, 32), read-only.
        self.images: np.ndarray = images[keep]
        #: int64 label of every image, read-only.
        self.targets: np.ndarray = label_of_fine[fine_labels[keep]]
        self.images.setflags(write=False)
        self.targets.setflags(write=False)


def _field(record: Any, key: str, path: Path, hint: str) -> Any:
    """``record[key]`` for a dict with bytes keys (Python 2 pickle) or str keys."""
    if isinstance(record, dict):
        for candidate in (key.encode("ascii"), key):
            if candidate in record:
                return record[candidate]
    found = sorted(map(repr, record)) if isinstance(record, dict) else type(record).__name__
    raise DatasetFileError(f"{path} should be a dict with key {key!r}, found {found}. {hint}")


def _read_cifar100(root: Path, strict: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(uint8 images N x 3 x 32 x 32, fine label per image, fine label names) of train + test."""
    hint = _how_to_obtain(root)
    folder = root / _FOLDER
    meta_path = folder / "meta"
    raw_names = _field(
        safe_load(meta_path, encoding="bytes", how_to_obtain=hint),
        "fine_label_names",
        meta_path,
        hint,
    )
    if not isinstance(raw_names, list):
        raise DatasetFileError(f"{meta_path}: 'fine_label_names' must be a list of names. {hint}")
    names = [name.decode("utf-8") if isinstance(name, bytes) else name for name in raw_names]
    if len(names) != 100 or len(set(names)) != 100 or not all(isinstance(n, str) for n in names):
        raise DatasetFileError(f"{meta_path} must list 100 distinct fine label names. {hint}")
    images, labels = [], []
    for part in ("train", "test"):
        path = folder / part
        record = safe_load(path, encoding="bytes", how_to_obtain=hint)
        data = _field(record, "data", path, hint)
        fine = np.asarray(_field(record, "fine_labels", path, hint))
        check_uint8_rows(data, ("N", 3072), str(path), hint)  # 32 x 32 RGB rows
        if (
            fine.shape != (len(data),)
            or fine.dtype.kind not in "iu"
            or (fine.size and (fine.min() < 0 or fine.max() >= 100))
        ):
            raise DatasetFileError(
                f"{path}: 'fine_labels' must give one label in [0, 100) per image "
                f"({len(data)} images). {hint}"
            )
        if strict and len(data) != CIFAR100Meta.STANDARD_IMAGES[part]:
            raise DatasetFileError(
                f"{path} holds {len(data)} images, CIFAR-100's {part} file holds "
                f"{CIFAR100Meta.STANDARD_IMAGES[part]} (pass strict=False to accept other files). {hint}"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(fine.astype(np.int64))
    fine_labels = np.concatenate(labels)
    counts = np.bincount(fine_labels, minlength=100)
    if strict and (counts != CIFAR100Meta.IMAGES_PER_CLASS).any():
        raise DatasetFileError(
            f"{folder}: classes hold {np.min(counts)} to {np.max(counts)} images, CIFAR-100 has 600 "
            f"each (pass strict=False to accept other files). {hint}"
        )
    return np.concatenate(images), fine_labels, names


def _download(root: Path) -> None:
    """Download with torchvision into a temporary folder; move in only the missing files."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / _FOLDER
    try:
        with tempfile.TemporaryDirectory(dir=root, prefix=".cifar-100-download-") as temporary:
            _log.info("downloading CIFAR-100 with torchvision into %s", root)
            torchvision.datasets.CIFAR100(temporary, train=True, download=True)
            target.mkdir(exist_ok=True)
            for name in _FILES:
                if not (target / name).is_file():
                    os.replace(Path(temporary) / _FOLDER / name, target / name)
    except Exception as err:
        raise DatasetDownloadError(
            f"Could not download CIFAR-100 into {root} ({type(err).__name__}: {err}); no partial "
            f"file was left behind. {_how_to_obtain(root)}"
        ) from err
