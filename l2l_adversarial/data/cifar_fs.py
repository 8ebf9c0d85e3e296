"""CIFAR-FS and FC100, the CIFAR-100 few-shot benchmarks, from MetaOptNet's pickles or from
torchvision's ``cifar-100-python``, decoded once into the memory-mapped cache.

Formats (``format=``; ``"auto"`` tries them in this order):

- ``"metaoptnet"``: ``CIFAR_FS_{train,val,test}.pickle`` / ``FC100_{train,val,test}.pickle``
  (Python 2 pickles: ``data`` N x 32 x 32 x 3 uint8, ``labels`` CIFAR-100 fine label ids),
  in ``root`` or ``root/CIFAR-FS`` / ``root/FC100``.
- ``"cifar-100-python"``: torchvision's ``root/cifar-100-python/{train,test,meta}``, with the
  published class split shipped in ``resources/`` (CIFAR-FS: Bertinetto et al. 2019; FC100:
  Oreshkin et al. 2018, by superclass). Downloadable with ``download=True``.

Both hold the same pixels, so they give the same rows and the same tasks for a seed.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from l2l_adversarial.data._images import MODES, is_data_file
from l2l_adversarial.data.cache import Plan
from l2l_adversarial.data.cifar100 import _FILES, _FOLDER, _download, _how_to_obtain, _read_cifar100
from l2l_adversarial.data.errors import DatasetFileError
from l2l_adversarial.data.mini_imagenet import metaoptnet_record
from l2l_adversarial.data.split import GUIDE, Format, StandardSplit

__all__ = ["CIFARFS", "FC100", "few_shot_cifar_split"]

_SPLIT_NAMES = {"train": "train", "validation": "val", "test": "test"}
_RESOURCES = {"cifar-fs": "cifar-fs-split.json", "fc100": "fc100-split.json"}


def few_shot_cifar_split(name: str) -> dict[str, list[str]]:
    """The shipped class split of ``"cifar-fs"`` or ``"fc100"``: {mode: sorted fine class names}.

    Example::

        few_shot_cifar_split("fc100")["test"][:3]  # ['ant', 'baby', 'bee']
    """
    text = resources.files("l2l_adversarial.data") / "resources" / _RESOURCES[name]
    document = json.loads(text.read_text(encoding="utf-8"))
    return {mode: sorted(document[mode]) for mode in MODES}


def _fine_names() -> list[str]:
    """CIFAR-100's fine label names in label order (its meta file lists them sorted)."""
    return sorted(name for names in few_shot_cifar_split("cifar-fs").values() for name in names)


class _FewShotCIFAR(StandardSplit):
    PICKLE_PREFIX: ClassVar[str] = ""
    FOLDER: ClassVar[str] = ""
    IMAGES_PER_CLASS = 600
    IMAGE_SHAPE = (3, 32, 32)
    DOWNLOAD_FORMAT = "cifar-100-python"

    @classmethod
    def fetch(cls, folder: Path, mode: str, strict: bool) -> None:
        """Download CIFAR-100 (python version) into ``folder``."""
        _download(folder)

    @classmethod
    def _pickle_name(cls, mode: str) -> str:
        return f"{cls.PICKLE_PREFIX}_{_SPLIT_NAMES[mode]}.pickle"

    @classmethod
    def _locate_pickle(cls, root: Path, mode: str) -> list[Path] | None:
        name = cls._pickle_name(mode)
        for folder in (root, root / cls.FOLDER):
            if is_data_file(folder / name):
                return [folder / name]
        return None

    @classmethod
    def _expected_pickle(cls, root: Path, mode: str) -> str:
        return f"MetaOptNet's {cls._pickle_name(mode)} in {root} or {root / cls.FOLDER}"

    @classmethod
    def _plan_pickle(
        cls, root: Path, mode: str, sources: list[Path], options: dict[str, Any]
    ) -> Plan:
        path = sources[0]
        hint = f"Obtain it again from MetaOptNet's data release; see {GUIDE}."
        data, labels, _ = metaoptnet_record(path, ("data", "labels"), hint)
        fine = _fine_names()
        wanted = set(few_shot_cifar_split(cls.NAME)[mode])
        if labels.size and (labels.min() < 0 or labels.max() >= 100):
            raise DatasetFileError(
                f"{path} is mislabelled: labels must be CIFAR-100 fine label ids in [0, 100), "
                f"found {labels.min()} to {labels.max()}. {hint}"
            )
        names = [fine[label] for label in labels.tolist()]
        foreign = sorted(set(names) - wanted)
        if foreign:
            raise DatasetFileError(
                f"{path} is mislabelled or of another split: classes {foreign[:5]} are not in "
                f"the published {cls.NAME} {mode} split. {hint}"
            )
        if data.shape[1:] != (32, 32, 3):
            raise DatasetFileError(f"{path}: images are {data.shape[1:]}, not 32 x 32 x 3. {hint}")
        return Plan(
            names,
            (3, 32, 32),
            (image.transpose(2, 0, 1) for image in data),
            f"decoding {cls.NAME} {mode} (metaoptnet)",
        )

    @classmethod
    def _locate_cifar(cls, root: Path, mode: str) -> list[Path] | None:
        files = [root / _FOLDER / name for name in _FILES]
        return files if all(map(is_data_file, files)) else None

    @classmethod
    def _expected_cifar(cls, root: Path, mode: str) -> str:
        return _how_to_obtain(root)

    @classmethod
    def _plan_cifar(
        cls, root: Path, mode: str, sources: list[Path], options: dict[str, Any]
    ) -> Plan:
        images, fine_labels, names = _read_cifar100(root, strict=False)
        wanted = set(few_shot_cifar_split(cls.NAME)[mode])
        keep = np.flatnonzero(
            np.isin(fine_labels, [names.index(name) for name in wanted if name in names])
        )
        if len(wanted - set(names)):
            raise DatasetFileError(
                f"{root / _FOLDER / 'meta'} lacks classes {sorted(wanted - set(names))[:5]} of "
                f"{cls.NAME}: not CIFAR-100's meta file. {_how_to_obtain(root)}"
            )
        return Plan(
            [names[label] for label in fine_labels[keep].tolist()],
            (3, 32, 32),
            (images[row] for row in keep),
            f"decoding {cls.NAME} {mode} (cifar-100-python)",
        )


def _formats(cls: type[_FewShotCIFAR]) -> tuple[Format, ...]:
    return (
        Format("metaoptnet", cls._locate_pickle, cls._expected_pickle, cls._plan_pickle),
        Format("cifar-100-python", cls._locate_cifar, cls._expected_cifar, cls._plan_cifar),
    )


class CIFARFS(_FewShotCIFAR):
    """CIFAR-FS (Bertinetto et al. 2019): CIFAR-100's classes split 64 / 16 / 20.

    Formats: see the module doc. Images: 3 x 32 x 32 float in [0, 1]; labels: the mode's
    class names sorted. ``strict=True`` requires 64 / 16 / 20 classes of 600 images.

    Example::

        test = CIFARFS("~/data", "test")  # MetaOptNet's CIFAR_FS_test.pickle or cifar-100-python
    """

    NAME = "cifar-fs"
    PICKLE_PREFIX = "CIFAR_FS"
    FOLDER = "CIFAR-FS"
    STANDARD_CLASSES = {"train": 64, "validation": 16, "test": 20}


class FC100(_FewShotCIFAR):
    """FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass, 60 / 20 / 20 classes.

    Formats: see the module doc. Images: 3 x 32 x 32 float in [0, 1]; labels: the mode's
    class names sorted. ``strict=True`` requires 60 / 20 / 20 classes of 600 images.

    Example::

        test = FC100("~/data", "test")  # MetaOptNet's FC100_test.pickle or cifar-100-python
    """

    NAME = "fc100"
    PICKLE_PREFIX = "FC100"
    FOLDER = "FC100"
    STANDARD_CLASSES = {"train": 60, "validation": 20, "test": 20}


CIFARFS.FORMATS = _formats(CIFARFS)
FC100.FORMATS = _formats(FC100)
