"""MiniImageNet from learn2learn's cache pickles, loaded without running code from the file."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from learn2learn.data import utils as l2l_data_utils
from torch import Tensor
from torch.utils.data import Dataset

from l2l_adversarial.data._images import MODES, as_root, check_mode, uint8_to_float
from l2l_adversarial.data.errors import DatasetDownloadError, DatasetFileError
from l2l_adversarial.data.safe_pickle import safe_load

__all__ = ["MiniImageNet"]

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


class MiniImageNet(Dataset[tuple[Tensor, int]]):
    """MiniImageNet (Vinyals et al. 2016; Ravi & Larochelle split) as ``(image, label)`` pairs.

    Reads ``root/mini-imagenet-cache-{mode}.pkl``, learn2learn's cache: a dict with
    ``image_data`` (uint8 array, N x 84 x 84 x 3) and ``class_dict`` ({class name: row
    indices}). Images stay uint8 in memory (read-only) and each item is converted to a new
    float tensor of shape 3 x 84 x 84 in [0, 1], then passed through ``transform``.

    Labels: the mode's class names (WordNet ids such as ``n01532829``) sorted by name are
    labels 0..C-1; ``classes[label]`` is the name and ``targets[i]`` the label of row i.

    ``strict=True`` (default) also requires the standard sizes: 84 x 84 images and 64 / 16 /
    20 classes of 600 images for train / validation / test. ``strict=False`` accepts any
    number of classes and images per class and any image size (small or home-made caches).

    ``download=True`` fetches a missing file with learn2learn's downloader (zenodo, then
    dropbox mirror), checks it and only then moves it into place; a failed download leaves
    no file behind and raises :class:`DatasetDownloadError`.

    Example::

        train = MiniImageNet("~/data", mode="train", download=True)
        image, label = train[0]  # image: float32 (3, 84, 84) in [0, 1]
    """

    STANDARD_CLASSES = {"train": 64, "validation": 16, "test": 20}
    IMAGES_PER_CLASS = 600
    IMAGE_SHAPE = (84, 84, 3)

    def __init__(
        self,
        root: str | os.PathLike[str],
        mode: str = "train",
        transform: Callable[[Tensor], Tensor] | None = None,
        download: bool = False,
        strict: bool = True,
    ) -> None:
        check_mode(mode)
        self.root = as_root(root, "MiniImageNet")
        self.mode = mode
        self.transform = transform
        self.strict = strict
        path = self.file_path(self.root, mode)
        if path.is_file():
            cache = _read_cache(path, mode, strict)
        elif download:
            cache = _download(path, mode, strict)
        else:
            raise FileNotFoundError(
                f"MiniImageNet file {path.name} not found in {self.root}. "
                + _how_to_obtain(path, mode)
            )
        #: uint8 array (N, H, W, 3), read-only.
        self.images: np.ndarray = cache[0]
        #: int64 label of every row, read-only.
        self.targets: np.ndarray = cache[1]
        #: class names; ``classes[label]`` names a label.
        self.classes: list[str] = cache[2]
        self.class_to_idx = {name: label for label, name in enumerate(self.classes)}

    @staticmethod
    def file_path(root: str | os.PathLike[str], mode: str) -> Path:
        """Where the cache of ``mode`` lives: ``root/mini-imagenet-cache-{mode}.pkl``."""
        check_mode(mode)
        return Path(root).expanduser() / f"mini-imagenet-cache-{mode}.pkl"

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = uint8_to_float(self.images[index], channels_last=True)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


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
    if strict and images.shape[1:] != MiniImageNet.IMAGE_SHAPE:
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
