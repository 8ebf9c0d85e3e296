"""A split's images as one tensor on a device, gathered into tasks by row index there.

Per-sample ``dataset[i]`` converts one uint8 image at a time on the host. An
:class:`ImageTable` instead holds the whole split as one tensor (uint8 stays uint8: 813 MB
for MiniImageNet's train split, 118 MB for CIFAR-100's paper train split), laid out
N x C x H x W as the datasets store it (on the CPU the table is the dataset's own array or
memory map, not a copy), and makes a task with one ``index_select`` and one float conversion, on whatever device the
table lives on. The values are bit-identical to the per-sample path: the conversion is the
same correctly rounded ``float32(x) / 255`` division (on the CPU by numpy, which converts
and divides in one pass; on CUDA by torch with a 0-dim tensor on the device, since CUDA
multiplies by a rounded reciprocal when the divisor is a Python scalar), and an elementwise
function of a uint8 is checked on all its 256 values (tests).

Example:
    >>> images = torch.arange(2 * 4 * 4 * 3, dtype=torch.uint8).reshape(2, 4, 4, 3)
    >>> table = ImageTable(images, channels_last=True, scale=True)
    >>> table.gather(torch.tensor([1, 0, 1])).shape
    torch.Size([3, 3, 4, 4])
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from learn2learn.data import MetaDataset
from torch import Tensor
from torch.utils.data import TensorDataset

from l2l_adversarial.data.cifar100 import CIFAR100Meta
from l2l_adversarial.data.digits import Digits
from l2l_adversarial.data.split import ImageSplit

__all__ = ["ImageTable", "image_table"]


class ImageTable:
    """All images of a split in one tensor; :meth:`gather` returns float32 N x C x H x W rows.

    ``channels_last``: rows come H x W x C; the table keeps them C x H x W (a transposed
    copy). The package's datasets all store C x H x W already: their CPU table shares their
    array (or memory map) and copies nothing. ``scale``: uint8 rows are
    returned as float32 in [0, 1] (``x / 255``); otherwise rows are returned as stored (a
    copy).
    """

    def __init__(
        self,
        images: Tensor | np.ndarray,
        *,
        channels_last: bool,
        scale: bool,
        device: torch.device | str = "cpu",
    ) -> None:
        if isinstance(images, np.ndarray):
            with warnings.catch_warnings():  # read-only caches: rows are only ever read
                warnings.filterwarnings("ignore", message=".*not writable.*")
                images = torch.from_numpy(images)
        if scale and images.dtype != torch.uint8:
            raise TypeError(f"scale=True needs uint8 images, got {images.dtype}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        if channels_last:  # stored once as N x C x H x W: a task's rows are then contiguous
            self.images = self.images.permute(0, 3, 1, 2).contiguous()
        self.scale = scale
        self._levels = torch.tensor(255.0, device=self.device)

    def __len__(self) -> int:
        return len(self.images)

    def gather(self, rows: Tensor) -> Tensor:
        """The images of ``rows`` (int64, any device), converted, on the table's device."""
        batch = self.images.index_select(0, rows.to(self.device, non_blocking=True))
        if not self.scale:
            return batch
        if self.device.type == "cpu":  # numpy converts and divides in one pass, torch in two
            return torch.from_numpy(np.divide(batch.numpy(), np.float32(255), dtype=np.float32))
        return batch.to(torch.float32).div_(self._levels)

    def __repr__(self) -> str:
        return f"ImageTable({tuple(self.images.shape)}, {self.images.dtype}, {self.device})"


def image_table(dataset: Any, device: torch.device | str = "cpu") -> ImageTable | None:
    """An :class:`ImageTable` that gives exactly ``dataset[i][0]`` for every row ``i``, or None.

    Known layouts: every :class:`~l2l_adversarial.data.split.ImageSplit` (MiniImageNet,
    CIFAR-FS, FC100, tieredImageNet, Omniglot, image folders), :class:`CIFAR100Meta` and
    :class:`Digits` without a
    ``transform`` (a transform may draw random numbers per sample: those datasets keep the
    per-sample path), and a ``TensorDataset`` of (inputs, labels); a learn2learn
    ``MetaDataset`` is unwrapped.
    """
    if isinstance(dataset, MetaDataset):
        dataset = dataset.dataset
    if isinstance(dataset, TensorDataset):
        if len(dataset.tensors) != 2:
            return None
        return ImageTable(dataset.tensors[0], channels_last=False, scale=False, device=device)
    if not isinstance(dataset, ImageSplit | CIFAR100Meta | Digits) or dataset.transform is not None:
        return None
    if isinstance(dataset, Digits):
        return ImageTable(dataset.images, channels_last=False, scale=False, device=device)
    return ImageTable(dataset.images, channels_last=False, scale=True, device=device)
