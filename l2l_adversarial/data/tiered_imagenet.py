"""tieredImageNet (Ren et al. 2018) from its PNG-bytes pickles, decoded once into the cache.

Format ``"png-pickles"`` (Ren et al.'s release, read by learn2learn and MetaOptNet):
``{train,val,test}_images_png.pkl`` (a list of PNG-encoded images, each a uint8 array or a
byte string) and ``{train,val,test}_labels.pkl`` (a dict with ``label_specific``, one int
per image, and optionally ``label_specific_str``, the class names), in ``root`` or
``root/tiered-imagenet``. Python 2 pickles, read through the restricted unpickler (byte
strings kept as bytes, names as latin-1 text). PNG is decoded by Pillow as RGB (learn2learn's loader, through OpenCV, keeps BGR).

At full size the train split's 448,695 images take 9.5 GB as uint8; they are decoded once
into the memory-mapped cache (the PNG pickle is held in memory only while decoding) and
read back from it by the operating system's page cache afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from l2l_adversarial.data._decode import decode_image
from l2l_adversarial.data._images import is_data_file
from l2l_adversarial.data.cache import Plan
from l2l_adversarial.data.errors import DatasetFileError
from l2l_adversarial.data.safe_pickle import python2_text, safe_load
from l2l_adversarial.data.split import GUIDE, Format, StandardSplit

__all__ = ["TieredImageNet"]

_SPLIT_NAMES = {"train": "train", "validation": "val", "test": "test"}
_FOLDERS = ("tiered-imagenet", "tiered_imagenet", "tieredImageNet")


def _files(folder: Path, mode: str) -> list[Path]:
    split = _SPLIT_NAMES[mode]
    return [folder / f"{split}_images_png.pkl", folder / f"{split}_labels.pkl"]


def _locate(root: Path, mode: str) -> list[Path] | None:
    for folder in (root, *(root / name for name in _FOLDERS)):
        files = _files(folder, mode)
        if all(map(is_data_file, files)):
            return files
    return None


def _expected(root: Path, mode: str) -> str:
    images, labels = _files(root, mode)
    return f"{images.name} + {labels.name} in {root} or {root}/{{{','.join(_FOLDERS)}}}"


def _class_names(
    record: dict[str, Any], labels: np.ndarray, labels_path: Path, hint: str
) -> list[str]:
    """Each label's class name: ``label_specific_str`` where the pickle has it."""
    raw_names = record.get("label_specific_str")
    if raw_names is None:
        return [f"class{label:04d}" for label in range(int(labels.max(initial=-1)) + 1)]
    names_of = [n.decode("latin-1") if isinstance(n, bytes) else str(n) for n in raw_names]
    if labels.size and labels.max() >= len(names_of):
        raise DatasetFileError(
            f"{labels_path} is mislabelled: label {labels.max()} has no name in "
            f"'label_specific_str' ({len(names_of)} names). {hint}"
        )
    return names_of


def _plan(root: Path, mode: str, sources: list[Path], options: dict[str, Any]) -> Plan:
    images_path, labels_path = sources
    hint = f"Obtain tieredImageNet's PNG pickles again (Ren et al.'s release); see {GUIDE}."
    record = python2_text(safe_load(labels_path, encoding="bytes", how_to_obtain=hint))
    if not isinstance(record, dict) or "label_specific" not in record:
        found = sorted(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise DatasetFileError(
            f"{labels_path} should be a dict with key 'label_specific', found {found}. {hint}"
        )
    labels = np.asarray(record["label_specific"])
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or (labels.size and labels.min() < 0):
        raise DatasetFileError(
            f"{labels_path}: 'label_specific' must be non-negative integer labels, one per image, "
            f"got dtype {labels.dtype} shape {labels.shape}. {hint}"
        )
    names_of = _class_names(record, labels, labels_path, hint)
    images = safe_load(images_path, encoding="bytes", how_to_obtain=hint)
    if not isinstance(images, list | np.ndarray) or len(images) != len(labels):
        count = len(images) if isinstance(images, list | np.ndarray) else type(images).__name__
        raise DatasetFileError(
            f"{images_path} must be a list of PNG-encoded images, one per label of "
            f"{labels_path.name} ({len(labels)}); found {count}. The two files come from "
            f"different splits or copies. {hint}"
        )

    if not len(labels):
        raise DatasetFileError(f"{labels_path} lists no image: an empty split. {hint}")

    def items() -> Iterator[np.ndarray]:
        for index, encoded in enumerate(images):
            if isinstance(encoded, str):  # a Python 2 byte string read as latin-1
                encoded = encoded.encode("latin-1")
            if not isinstance(encoded, bytes | np.ndarray):
                raise DatasetFileError(
                    f"{images_path}: image {index} is a {type(encoded).__name__}, not PNG "
                    f"bytes. {hint}"
                )
            yield decode_image(encoded, size=None, where=f"{images_path} image {index}", hint=hint)

    first = decode_image(
        images[0] if not isinstance(images[0], str) else images[0].encode("latin-1"),
        size=None,
        where=f"{images_path} image 0",
        hint=hint,
    )
    return Plan(
        names=[names_of[label] for label in labels.tolist()],
        shape=(3, *first.shape[1:]),
        items=items(),
        what=f"decoding tieredImageNet {mode} (PNG)",
    )


class TieredImageNet(StandardSplit):
    """tieredImageNet: 608 ImageNet classes under 34 categories, 351 / 97 / 160 classes.

    Reads the PNG-bytes pickles of the module doc and decodes them once into the uint8
    3 x 84 x 84 memory-mapped cache. Labels: the class names (``label_specific_str``, or
    ``classNNNN`` from ``label_specific`` when the file has no names) sorted by name.
    ``strict=True`` requires 351 / 97 / 160 classes and 84 x 84 images.

    Example::

        train = TieredImageNet("~/data/tiered-imagenet", "train")  # decodes once (minutes)
    """

    NAME = "tiered-imagenet"
    FORMATS = (Format("png-pickles", _locate, _expected, _plan),)
    STANDARD_CLASSES = {"train": 351, "validation": 97, "test": 160}
