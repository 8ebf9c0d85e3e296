"""Datasets and task sources by name, for command lines and configuration files."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from l2l_adversarial.data.cifar100 import CIFAR100Meta
from l2l_adversarial.data.cifar_fs import CIFARFS, FC100
from l2l_adversarial.data.digits import Digits
from l2l_adversarial.data.folders import ImageFolderSplit, Omniglot
from l2l_adversarial.data.mini_imagenet import MiniImageNet
from l2l_adversarial.data.tasks import FewShotTasks
from l2l_adversarial.data.tiered_imagenet import TieredImageNet
from l2l_adversarial.validation import check_choice

__all__ = ["DATASETS", "DATASET_INFO", "DatasetInfo", "load_dataset", "make_tasks"]


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset name stands for: its class, title, formats and the options it takes."""

    title: str
    make: Callable[..., Dataset[tuple[Tensor, int]]]
    #: the values of ``format=`` besides ``"auto"`` (empty: one format, no choice)
    formats: tuple[str, ...] = ()
    #: keyword options the dataset class accepts (besides root, mode, transform)
    options: tuple[str, ...] = ()
    #: shipped inside an installed package: no root needed
    bundled: bool = False
    #: ``download=True`` can fetch it
    downloadable: bool = False


def _split_of(split: str) -> Callable[..., Dataset[tuple[Tensor, int]]]:
    def make(root: Any, mode: str, **kwargs: Any) -> Dataset[tuple[Tensor, int]]:
        return CIFAR100Meta(root, mode, split, **kwargs)

    return make


_CACHED = ("strict", "format", "cache_dir")
#: Every dataset name accepted by :func:`load_dataset`, :func:`make_tasks` and the config.
DATASET_INFO: dict[str, DatasetInfo] = {
    "mini-imagenet": DatasetInfo(
        "MiniImageNet",
        MiniImageNet,
        tuple(f.name for f in MiniImageNet.FORMATS),
        _CACHED,
        downloadable=True,
    ),
    "cifar100": DatasetInfo("CIFAR100", _split_of("paper"), (), ("strict",), downloadable=True),
    "cifar-fs": DatasetInfo(
        "CIFAR-FS", CIFARFS, tuple(f.name for f in CIFARFS.FORMATS), _CACHED, downloadable=True
    ),
    "fc100": DatasetInfo(
        "FC100", FC100, tuple(f.name for f in FC100.FORMATS), _CACHED, downloadable=True
    ),
    "tiered-imagenet": DatasetInfo(
        "tieredImageNet", TieredImageNet, tuple(f.name for f in TieredImageNet.FORMATS), _CACHED
    ),
    "omniglot": DatasetInfo(
        "Omniglot", Omniglot, (), ("strict", "image_size", "rotations", "cache_dir")
    ),
    "image-folder": DatasetInfo(
        "Image folder",
        ImageFolderSplit,
        (),
        ("image_size", "channels", "split_file", "split_ratio", "split_seed", "cache_dir"),
    ),
    "digits": DatasetInfo("Digits", Digits, (), ("image_size",), bundled=True),
}
#: Dataset names accepted by :func:`load_dataset` and :func:`make_tasks`.
DATASETS = tuple(DATASET_INFO)


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    mode: str = "train",
    *,
    download: bool = False,
    transform: Callable[[Tensor], Tensor] | None = None,
    **options: Any,
) -> Dataset[tuple[Tensor, int]]:
    """One split of a dataset by name (:data:`DATASET_INFO` lists them).

    ``"mini-imagenet"``: :class:`MiniImageNet`; ``"cifar100"``: :class:`CIFAR100Meta` with
    ``split="paper"``; ``"cifar-fs"`` / ``"fc100"``: :class:`~.cifar_fs.CIFARFS` /
    :class:`~.cifar_fs.FC100`; ``"tiered-imagenet"``: :class:`~.tiered_imagenet.TieredImageNet`;
    ``"omniglot"``: :class:`~.folders.Omniglot`; ``"image-folder"``:
    :class:`~.folders.ImageFolderSplit` (your own ``root/<class>/<images>``); ``"digits"``:
    :class:`Digits` (bundled; ``root`` and ``download`` are ignored and there is no
    ``"validation"`` mode). ``options`` go to the dataset class (``strict=False``,
    ``format="ravi"``, ``image_size=...``; :data:`DATASET_INFO` says which).

    Example::

        test = load_dataset("cifar100", "~/data", "test", download=True)
    """
    check_choice("name", name, DATASETS)
    info = DATASET_INFO[name]
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        raise TypeError(f"dataset {name!r} takes the options {list(info.options)}, not {unknown}")
    if name == "digits":
        if mode == "validation":
            raise ValueError(
                "the digits quickstart has only mode='train' (digits 0-4) and mode='test' "
                "(digits 5-9): 10 classes leave none for validation; validate on another dataset"
            )
        return Digits(mode, transform=transform, **options)
    if root is None:
        raise ValueError(
            f"root is required for {name!r}: the directory that holds (or will hold) its files"
        )
    if info.downloadable:
        options["download"] = download
    return info.make(root, mode, transform=transform, **options)


def make_tasks(
    name: str,
    root: str | os.PathLike[str] | None,
    mode: str,
    ways: int,
    shots: int,
    query_shots: int,
    seed: int | None = None,
    num_tasks: int = -1,
    *,
    download: bool = False,
    transform: Callable[[Tensor], Tensor] | None = None,
    device: torch.device | str | None = None,
    **options: Any,
) -> FewShotTasks:
    """Few-shot tasks from one split of a named dataset (see :func:`load_dataset`).

    ``device`` keeps the split's images on that device and builds the tasks there
    (see :class:`FewShotTasks`).

    Example::

        train_tasks = make_tasks("mini-imagenet", "~/data", "train", 5, 1, 15, seed=0)
        test_tasks = make_tasks("mini-imagenet", "~/data", "test", 5, 1, 15, seed=1, num_tasks=600)
    """
    dataset = load_dataset(name, root, mode, download=download, transform=transform, **options)
    return FewShotTasks(
        dataset, ways, shots, query_shots, num_tasks=num_tasks, seed=seed, device=device
    )
