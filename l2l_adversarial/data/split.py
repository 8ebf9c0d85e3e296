"""The base of the image datasets that read several on-disk formats through the decode cache.

A dataset class lists its :class:`Format` objects; :class:`ImageSplit` finds the format in
``root`` (or takes the one named), decodes the split once into the memory-mapped cache
(:mod:`l2l_adversarial.data.cache`) and serves ``(image, label)`` pairs from it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from l2l_adversarial.data._images import UInt8Items, as_root, check_mode
from l2l_adversarial.data.cache import Decoded, Plan, cache_folder, load_decoded
from l2l_adversarial.data.errors import DatasetFileError, DatasetNotFoundError
from l2l_adversarial.validation import check_choice

__all__ = ["Format", "ImageSplit", "StandardSplit"]

#: Where the data guide lives (named by error messages).
GUIDE = "docs/data-formats.md"


@dataclass(frozen=True)
class Format:
    """One on-disk format of a dataset.

    ``locate(root, mode)`` returns the source files of the split (every file whose content
    the decoded images depend on) or None when the format is not there; ``expected(root,
    mode)`` says what was looked for; ``plan(root, mode, sources, options)`` opens the
    sources and returns the :class:`~l2l_adversarial.data.cache.Plan` to decode.
    """

    name: str
    locate: Callable[[Path, str], list[Path] | None]
    expected: Callable[[Path, str], str]
    plan: Callable[[Path, str, list[Path], dict[str, Any]], Plan]


def _folder_hint(root: Path) -> str:
    """A hint when ``root`` looks like a folder of class folders of images."""
    from l2l_adversarial.data._decode import IMAGE_SUFFIXES

    if not root.is_dir():
        return ""
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))[
        :5
    ]:
        if any(f.suffix.lower() in IMAGE_SUFFIXES for f in folder.iterdir()):
            return (
                f" {root} holds class folders of images ({folder.name}/...): to use your own "
                "images, set dataset.name: image-folder (ImageFolderSplit)."
            )
    return ""


class ImageSplit(UInt8Items, Dataset[tuple[Tensor, int]]):
    """One split of an image dataset, decoded once into a uint8 C x H x W cache.

    ``images`` (N x C x H x W uint8, read-only, usually a memory map), ``targets`` (int64),
    ``classes`` (``classes[label]`` names a label, sorted by name) and ``format`` (the format
    read). Each item is a new float32 C x H x W tensor in [0, 1], passed through
    ``transform``.
    """

    #: the dataset's name in messages and cache keys
    NAME: ClassVar[str] = "dataset"
    #: the formats, in the order auto-detection tries them
    FORMATS: ClassVar[tuple[Format, ...]] = ()

    def __init__(
        self,
        root: str | os.PathLike[str],
        mode: str,
        *,
        format: str = "auto",
        transform: Callable[[Tensor], Tensor] | None = None,
        cache_dir: str | os.PathLike[str] | bool | None = None,
        options: dict[str, Any] | None = None,
        key_suffix: str = "",
    ) -> None:
        check_mode(mode)
        self.root = as_root(root, self.NAME)
        self.mode = mode
        self.transform = transform
        self.options = dict(options or {})
        chosen, sources = self._find(format)
        #: the format read, by name
        self.format: str = chosen.name
        key = f"{self.NAME}-{mode}-{chosen.name}{key_suffix}{self._key_extra()}"
        decoded = load_decoded(
            key=key,
            root=self.root,
            sources=sources,
            plan=lambda: chosen.plan(self.root, mode, sources, self.options),
            cache_dir=cache_folder(self.root, cache_dir),
        )
        self._set(decoded)

    @classmethod
    def missing(cls, root: Path, mode: str, format: str) -> bool:
        """Whether no format (or not the one named) is in ``root``: a download is due."""
        return not any(f.locate(root, mode) for f in cls.FORMATS if format in ("auto", f.name))

    def _key_extra(self) -> str:
        """More of the cache's name, known once the sources are found (default: nothing)."""
        return ""

    def _set(self, decoded: Decoded) -> None:
        #: uint8 array (N, C, H, W), read-only (a memory map unless ``cache_dir=False``).
        self.images: np.ndarray = decoded.images
        #: int64 label of every row, read-only.
        self.targets: np.ndarray = decoded.targets
        #: class names; ``classes[label]`` names a label.
        self.classes: list[str] = decoded.classes
        self.class_to_idx = {name: label for label, name in enumerate(self.classes)}
        #: the cache's images file, or None when decoded into memory
        self.cache_path = decoded.cache_path

    def _find(self, format: str) -> tuple[Format, list[Path]]:
        names = [candidate.name for candidate in self.FORMATS]
        if format != "auto":
            check_choice("format", format, (*names, "auto"))
        candidates = [f for f in self.FORMATS if format in ("auto", f.name)]
        for candidate in candidates:
            sources = candidate.locate(self.root, self.mode)
            if sources is not None:
                return candidate, sources
        looked = " | ".join(
            f"{candidate.name}: {candidate.expected(self.root, self.mode)}"
            for candidate in candidates
        )
        which = "any known format" if format == "auto" else f"format {format!r}"
        raise DatasetNotFoundError(
            f"no {self.NAME} {self.mode} split of {which} in {self.root} (looked for {looked}); "
            f"put one of these in dataset.root (or point dataset.root at the folder holding "
            f"them); every format is described in {GUIDE}.{_folder_hint(self.root)}"
        )

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (for worker processes) without the images: the copy maps the cache file
        again instead of carrying (and copying) the whole split."""
        state = dict(self.__dict__)
        if self.cache_path is not None:
            state["images"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.images is None:
            self.images = np.load(self.cache_path, mmap_mode="r", allow_pickle=False)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.root)!r}, {self.mode!r}, format={self.format!r}: "
            f"{len(self)} images of {len(self.classes)} classes, {tuple(self.images.shape[1:])})"
        )


class StandardSplit(ImageSplit):
    """A benchmark's split (mini-ImageNet, CIFAR-FS, FC100, tieredImageNet): downloadable where
    a public copy exists, checked against the benchmark's standard sizes when ``strict``.

    Subclasses name ``STANDARD_CLASSES`` (per mode), ``IMAGES_PER_CLASS`` (None: any),
    ``IMAGE_SHAPE`` (C, H, W) and, where a download exists, ``DOWNLOAD_FORMAT`` and
    :meth:`fetch`.
    """

    STANDARD_CLASSES: ClassVar[dict[str, int]] = {}
    IMAGES_PER_CLASS: ClassVar[int | None] = None
    IMAGE_SHAPE: ClassVar[tuple[int, int, int]] = (3, 84, 84)
    #: the format a download provides (None: the dataset cannot be downloaded)
    DOWNLOAD_FORMAT: ClassVar[str | None] = None

    def __init__(
        self,
        root: str | os.PathLike[str],
        mode: str = "train",
        transform: Callable[[Tensor], Tensor] | None = None,
        download: bool = False,
        strict: bool = True,
        *,
        format: str = "auto",
        cache_dir: str | os.PathLike[str] | bool | None = None,
    ) -> None:
        check_mode(mode)
        self.strict = strict
        if download:
            folder = as_root(root, self.NAME)
            if self.DOWNLOAD_FORMAT is None:
                raise ValueError(
                    f"{self.NAME} has no public download; obtain its files as {GUIDE} says "
                    "and pass download=False"
                )
            if format in ("auto", self.DOWNLOAD_FORMAT) and self.missing(folder, mode, format):
                self.fetch(folder, mode, strict)
        super().__init__(root, mode, format=format, transform=transform, cache_dir=cache_dir)
        if strict:
            self.check_standard()

    @classmethod
    def fetch(cls, folder: Path, mode: str, strict: bool) -> None:
        """Download ``mode``'s files into ``folder`` (only where ``DOWNLOAD_FORMAT`` is set)."""
        raise NotImplementedError

    def check_standard(self) -> None:
        """Raise :class:`DatasetFileError` unless the split has the standard sizes."""
        counts = np.bincount(self.targets, minlength=len(self.classes))
        classes, per_class = self.STANDARD_CLASSES[self.mode], self.IMAGES_PER_CLASS
        problems = []
        if len(self.classes) != classes:
            problems.append(f"{len(self.classes)} classes instead of {classes}")
        if per_class is not None and len(counts) and (counts != per_class).any():
            problems.append(
                f"{counts.min()} to {counts.max()} images per class instead of {per_class}"
            )
        if tuple(self.images.shape[1:]) != self.IMAGE_SHAPE:
            found, standard = (
                " x ".join(map(str, s)) for s in (self.images.shape[1:], self.IMAGE_SHAPE)
            )
            problems.append(f"images of {found} instead of {standard}")
        if problems:
            raise DatasetFileError(
                f"the {self.NAME} {self.mode} split read from {self.root} ({self.format}) has "
                f"{'; '.join(problems)}: not the standard {self.NAME}. Check that dataset.root "
                "holds the right files, or pass strict=False (dataset.strict: false) to accept "
                "a non-standard copy."
            )
