"""Helpers shared by the dataset classes: modes, roots and uint8-to-float conversion."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from l2l_adversarial.data.errors import DatasetFileError
from l2l_adversarial.validation import check_choice

MODES = ("train", "validation", "test")


def check_uint8_rows(data: object, shape: tuple[int | str, ...], where: str, hint: str) -> None:
    """Raise :class:`DatasetFileError` unless ``data`` is a uint8 array of ``shape`` (a name
    such as ``"N"``: any size); ``where`` names the file, ``hint`` how to obtain it again."""
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == len(shape)
        and all(
            isinstance(size, str) or size == n for size, n in zip(shape, data.shape, strict=True)
        )
    ):
        expected = ", ".join(map(str, shape))
        raise DatasetFileError(
            f"{where}: 'data' must be a uint8 array of shape ({expected}), got "
            f"{type(data).__name__} dtype={getattr(data, 'dtype', None)} "
            f"shape={getattr(data, 'shape', None)}. {hint}"
        )


def check_mode(mode: str) -> None:
    """Raise ``ValueError`` unless ``mode`` is one of :data:`MODES`."""
    check_choice("mode", mode, MODES)


def as_root(root: str | os.PathLike[str], dataset: str) -> Path:
    """Return ``root`` as a Path, rejecting a root that is an existing file."""
    if not isinstance(root, str | os.PathLike):
        raise TypeError(f"root must be a directory path for {dataset}, got {type(root).__name__}")
    path = Path(root).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"root {path} is a file; pass the directory that holds {dataset}")
    return path


def is_data_file(path: Path) -> bool:
    """Whether a dataset file is at ``path``; a folder there is refused as one, not taken for
    a missing file (:class:`~l2l_adversarial.data.errors.DatasetFileError`)."""
    if path.is_dir():
        raise DatasetFileError(
            f"{str(path)!r} is a folder, not a file; put the dataset's file there (rename or "
            "remove the folder), or point dataset.root elsewhere"
        )
    return path.is_file()


def uint8_to_float(image: np.ndarray, channels_last: bool) -> Tensor:
    """Copy one uint8 image into a new float32 CHW tensor in [0, 1]."""
    tensor = torch.tensor(image, dtype=torch.float32).div_(255.0)
    return tensor.permute(2, 0, 1).contiguous() if channels_last else tensor


class UInt8Items:
    """``len`` and ``[i]`` of a dataset holding ``images`` (uint8 N x C x H x W), ``targets``
    and ``transform``: item i is a new float32 C x H x W tensor in [0, 1], transformed."""

    images: np.ndarray
    targets: np.ndarray
    transform: Callable[[Tensor], Tensor] | None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = uint8_to_float(self.images[index], channels_last=False)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
