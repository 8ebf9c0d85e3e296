"""Datasets stored as one folder of image files per class: your own images and Omniglot.

- :class:`ImageFolderSplit`: ``root/<class>/<images>`` (``dataset.name: image-folder``), class
  splits from a JSON/YAML file or a seeded ratio, images resized to ``image_size``.
- :class:`Omniglot`: torchvision's ``omniglot-py/images_background`` and
  ``images_evaluation`` (``<alphabet>/<character>/*.png``), 28 x 28, optionally with the
  rotations by 90, 180 and 270 degrees as extra classes.

Both decode every image with Pillow (:mod:`~l2l_adversarial.data._decode`) once into the
memory-mapped cache; an image that cannot be decoded is named in the error, with every other
one found in the same pass.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from torch import Tensor

from l2l_adversarial.data._decode import IMAGE_SUFFIXES, decode_image
from l2l_adversarial.data._images import MODES, check_mode, is_data_file
from l2l_adversarial.data.cache import Decoded, Plan
from l2l_adversarial.data.cifar100 import random_class_split
from l2l_adversarial.data.errors import DatasetFileError, DatasetNotFoundError
from l2l_adversarial.data.split import GUIDE, Format, ImageSplit

__all__ = ["ImageFolderSplit", "Omniglot", "ratio_sizes"]

_SHOWN = 10


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.iterdir()
        if path.is_file()
        and not path.name.startswith(".")
        and path.suffix.lower() in IMAGE_SUFFIXES
    )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def ratio_sizes(count: int, ratio: Sequence[float]) -> dict[str, int]:
    """Class counts per mode for ``count`` classes split by ``ratio`` (train, validation,
    test): train and validation rounded, test the rest."""
    if len(ratio) != 3 or any(r < 0 for r in ratio) or not 0.999 <= sum(ratio) <= 1.001:
        raise ValueError(
            f"split ratio must be three non-negative fractions (train, validation, test) that "
            f"sum to 1, got {list(ratio)}"
        )
    train = round(count * ratio[0])
    validation = min(round(count * ratio[1]), count - train)
    return {"train": train, "validation": validation, "test": count - train - validation}


def _read_split_file(path: Path, classes: list[str]) -> dict[str, list[str]]:
    hint = (
        "The split file is JSON or YAML mapping train, validation and test to lists of class "
        f"folder names; see {GUIDE}."
    )
    if not is_data_file(path):
        raise DatasetFileError(f"split file {path} does not exist. {hint}")
    try:
        text = path.read_text(encoding="utf-8")
        document = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        raise DatasetFileError(f"split file {path} cannot be read ({err}). {hint}") from err
    if not isinstance(document, dict) or not set(document) <= set(MODES):
        found = (
            sorted(map(str, document)) if isinstance(document, dict) else type(document).__name__
        )
        raise DatasetFileError(
            f"split file {path} has keys {found}, expected {list(MODES)}. {hint}"
        )
    split: dict[str, list[str]] = {}
    for mode in MODES:
        names = document.get(mode) or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DatasetFileError(
                f"split file {path}: {mode} must be a list of class names. {hint}"
            )
        split[mode] = sorted(names)
    every = [name for names in split.values() for name in names]
    twice = sorted({name for name in every if every.count(name) > 1})
    unknown = sorted(set(every) - set(classes))
    if twice or unknown:
        problem = (
            f"classes {twice[:_SHOWN]} are in two splits"
            if twice
            else (f"classes {unknown[:_SHOWN]} have no folder in the dataset root")
        )
        raise DatasetFileError(f"split file {path}: {problem}. {hint}")
    return split


def _decode_all(
    files: list[Path], size: tuple[int, int], mode: str, hint: str
) -> Iterator[np.ndarray]:
    """Decode every file; after the last, raise one error naming every unreadable file."""
    unreadable: list[str] = []
    blank = np.zeros((1 if mode == "L" else 3, *size), np.uint8)
    for path in files:
        try:
            yield decode_image(path, size=size, mode=mode, where=str(path))
        except DatasetFileError:
            unreadable.append(str(path))
            yield blank
    if unreadable:
        raise DatasetFileError(
            f"{len(unreadable)} image file(s) cannot be decoded: {', '.join(unreadable[:_SHOWN])}"
            f"{' ...' if len(unreadable) > _SHOWN else ''}. Replace or delete them. {hint}"
        )


class ImageFolderSplit(ImageSplit):
    """Your own images, one folder per class: ``root/<class>/<image files>``.

    Classes are the subfolders of ``root`` (hidden ones skipped); images are the files with
    an image suffix (``.jpg``, ``.jpeg``, ``.png``, ``.bmp``, ``.gif``, ``.webp``, ``.tif``,
    ``.tiff``, ``.ppm``, any case). The split of classes into train / validation / test
    comes from ``split_file`` (JSON or YAML: ``{"train": [...], "validation": [...], "test":
    [...]}``) or, without one, from ``split_ratio`` (fractions of the classes) and
    ``split_seed`` by :func:`~l2l_adversarial.data.cifar100.random_class_split`. Images are
    decoded by Pillow to RGB (``channels=3``) or grey (``channels=1``) and resized to
    ``image_size`` x ``image_size`` (Lanczos) when not that size already.

    Example::

        train = ImageFolderSplit("~/my-images", "train", image_size=84, split_seed=0)
    """

    NAME = "image-folder"

    def __init__(
        self,
        root: str | os.PathLike[str],
        mode: str = "train",
        transform: Callable[[Tensor], Tensor] | None = None,
        *,
        image_size: int = 84,
        channels: int = 3,
        split_file: str | os.PathLike[str] | None = None,
        split_ratio: Sequence[float] = (0.64, 0.16, 0.20),
        split_seed: int = 0,
        cache_dir: str | os.PathLike[str] | bool | None = None,
    ) -> None:
        check_mode(mode)
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(
                f"image_size must be a positive int (pixels per side), got {image_size!r}"
            )
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
        options = {
            "image_size": image_size,
            "channels": channels,
            "split_file": None if split_file is None else Path(split_file).expanduser(),
            "split_ratio": tuple(split_ratio),
            "split_seed": split_seed,
        }
        self._classes_of_mode: list[str] = []
        super().__init__(
            root,
            mode,
            format="folders",
            transform=transform,
            cache_dir=cache_dir,
            options=options,
            key_suffix=f"-{image_size}px-{channels}ch",
        )

    FORMATS = ()  # set below: the format needs the instance's options

    def _find(self, format: str) -> tuple[Format, list[Path]]:
        root, mode, options = self.root, self.mode, self.options
        hint = f"Expected root/<class>/<image files> (an image folder); see {GUIDE}."
        if not root.is_dir() or not _subfolders(root):
            raise DatasetNotFoundError(
                f"no image-folder dataset in {root}: {'it has no class subfolders' if root.is_dir() else 'it does not exist'}. "
                f"{hint}"
            )
        classes = [p.name for p in _subfolders(root)]
        if options["split_file"] is not None:
            split = _read_split_file(options["split_file"], classes)
        else:
            try:
                sizes = ratio_sizes(len(classes), options["split_ratio"])
                split = random_class_split(classes, options["split_seed"], sizes)
            except ValueError as err:
                raise DatasetFileError(f"image folder {root}: {err}. {hint}") from err
        if not split[mode]:
            raise DatasetFileError(
                f"image folder {root} ({len(classes)} classes) leaves no class for {mode}: set "
                f"dataset.split_ratio or a split file that gives {mode} classes. {hint}"
            )
        files: list[Path] = []
        empty = []
        for name in split[mode]:
            found = _image_files(root / name)
            empty += [name] if not found else []
            files += found
        if empty:
            raise DatasetFileError(
                f"image folder {root}: class folder(s) {empty[:_SHOWN]} hold no image file "
                f"(suffixes: {', '.join(IMAGE_SUFFIXES)}). Add images or remove the folders. {hint}"
            )
        self._classes_of_mode = split[mode]
        size = options["image_size"]
        grey = "L" if options["channels"] == 1 else "RGB"

        def plan(root: Path, mode: str, sources: list[Path], _: dict[str, Any]) -> Plan:
            return Plan(
                names=[path.parent.name for path in sources],
                shape=(options["channels"], size, size),
                items=_decode_all(sources, (size, size), grey, hint),
                what=f"decoding image folder {root.name} ({mode})",
            )

        chosen = Format("folders", lambda r, m: files, lambda r, m: hint, plan)
        return chosen, files

    def _key_extra(self) -> str:
        """The mode's classes belong in the cache's name: each split has its own cache."""
        return "-" + hashlib.sha256("\n".join(self._classes_of_mode).encode()).hexdigest()[:12]


# -- Omniglot -------------------------------------------------------------------------------------
_OMNIGLOT_SETS = ("images_background", "images_evaluation")
#: Class counts of the Omniglot split (learn2learn's benchmark sizes), over all 1623 characters.
OMNIGLOT_SIZES = {"train": 1100, "validation": 100, "test": 423}
_OMNIGLOT_SEED = 0


class Omniglot(ImageSplit):
    """Omniglot (Lake et al. 2015) from torchvision's ``omniglot-py`` folders, 28 x 28 grey.

    Reads ``root/omniglot-py/images_background`` and ``images_evaluation`` (each
    ``<alphabet>/<character>/*.png``; ``root`` may also be the ``omniglot-py`` folder). The
    1623 characters (classes, named ``alphabet/character``) are split 1100 / 100 / 423 into
    train / validation / test by :func:`~l2l_adversarial.data.cifar100.random_class_split`
    with seed 0 (other counts of characters: the same fractions). Images are resized from
    105 x 105 to ``image_size`` (28) with Lanczos, grey, 1 x 28 x 28 in [0, 1] (white
    background, as the files are).

    ``rotations=True`` adds each class rotated by 90, 180 and 270 degrees as three more
    classes (``name@rot090`` ...), as MAML and Vinyals et al. do for training.
    ``strict=True`` requires the 1623 characters of 20 images.

    Example::

        train = Omniglot("~/data", "train", rotations=True)  # 4400 classes
    """

    NAME = "omniglot"
    CHARACTERS = 1623
    IMAGES_PER_CLASS = 20

    def __init__(
        self,
        root: str | os.PathLike[str],
        mode: str = "train",
        transform: Callable[[Tensor], Tensor] | None = None,
        strict: bool = True,
        *,
        image_size: int = 28,
        rotations: bool = False,
        cache_dir: str | os.PathLike[str] | bool | None = None,
    ) -> None:
        self.strict = strict
        self.rotations = rotations
        super().__init__(
            root,
            mode,
            format="omniglot-py",
            transform=transform,
            cache_dir=cache_dir,
            options={"image_size": image_size},
            key_suffix=f"-{image_size}px",
        )
        if rotations:
            self._add_rotations()

    FORMATS = ()

    def _folder(self) -> Path | None:
        for folder in (self.root / "omniglot-py", self.root):
            if all((folder / name).is_dir() for name in _OMNIGLOT_SETS):
                return folder
        return None

    def _find(self, format: str) -> tuple[Format, list[Path]]:
        folder = self._folder()
        hint = (
            f"Expected torchvision's {self.root / 'omniglot-py'}/images_background and "
            "images_evaluation (torchvision.datasets.Omniglot(root, background=True/False, "
            f"download=True) writes them); see {GUIDE}."
        )
        if folder is None:
            raise DatasetNotFoundError(f"no Omniglot in {self.root}. {hint}")
        characters: dict[str, Path] = {}
        for set_name in _OMNIGLOT_SETS:
            for alphabet in _subfolders(folder / set_name):
                for character in _subfolders(alphabet):
                    characters[f"{alphabet.name}/{character.name}"] = character
        names = sorted(characters)
        if self.strict and len(names) != self.CHARACTERS:
            raise DatasetFileError(
                f"Omniglot in {folder} has {len(names)} characters, not {self.CHARACTERS}: an "
                "incomplete extraction (pass strict=False to accept it). " + hint
            )
        fraction = [OMNIGLOT_SIZES[m] / self.CHARACTERS for m in MODES]
        split = random_class_split(names, _OMNIGLOT_SEED, ratio_sizes(len(names), fraction))
        files: list[Path] = []
        for name in split[self.mode]:
            found = _image_files(characters[name])
            if not found or (self.strict and len(found) != self.IMAGES_PER_CLASS):
                raise DatasetFileError(
                    f"Omniglot character folder {characters[name]} holds {len(found)} images, "
                    f"not {self.IMAGES_PER_CLASS} (pass strict=False to accept it). {hint}"
                )
            files += found
        size = self.options["image_size"]
        names_of = {path: f"{path.parent.parent.name}/{path.parent.name}" for path in files}

        def plan(root: Path, mode: str, sources: list[Path], _: dict[str, Any]) -> Plan:
            return Plan(
                names=[names_of[path] for path in sources],
                shape=(1, size, size),
                items=_decode_all(sources, (size, size), "L", hint),
                what=f"decoding Omniglot {mode}",
            )

        return Format("omniglot-py", lambda r, m: files, lambda r, m: hint, plan), files

    def _add_rotations(self) -> None:
        """Each class c becomes c@rot000, c@rot090, c@rot180, c@rot270 (counter-clockwise)."""
        blocks: list[np.ndarray] = []
        targets: list[np.ndarray] = []
        classes: list[str] = []
        for label, name in enumerate(self.classes):
            rows = np.asarray(self.images[self.targets == label])
            for turn in range(4):
                blocks.append(np.rot90(rows, turn, axes=(2, 3)))
                targets.append(np.full(len(rows), len(classes), np.int64))
                classes.append(f"{name}@rot{90 * turn:03d}")
        images = np.ascontiguousarray(np.concatenate(blocks))
        images.setflags(write=False)
        target_array = np.concatenate(targets)
        target_array.setflags(write=False)
        self._set(Decoded(images, target_array, classes, None))
