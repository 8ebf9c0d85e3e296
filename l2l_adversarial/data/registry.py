"""Datasets and task sources by name, for command lines and configuration files."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from l2l_adversarial.data.cifar100 import CIFAR100Meta
from l2l_adversarial.data.digits import Digits
from l2l_adversarial.data.mini_imagenet import MiniImageNet
from l2l_adversarial.data.tasks import FewShotTasks
from l2l_adversarial.validation import check_choice

__all__ = ["DATASETS", "load_dataset", "make_tasks"]

#: Dataset names accepted by :func:`load_dataset` and :func:`make_tasks`.
DATASETS = ("mini-imagenet", "cifar100", "cifar-fs", "digits")


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    mode: str = "train",
    *,
    download: bool = False,
    transform: Callable[[Tensor], Tensor] | None = None,
    **options: Any,
) -> Dataset[tuple[Tensor, int]]:
    """One split of a dataset by name.

    ``"mini-imagenet"``: :class:`MiniImageNet`; ``"cifar100"``: :class:`CIFAR100Meta` with
    ``split="paper"``; ``"cifar-fs"``: :class:`CIFAR100Meta` with ``split="cifar-fs"``;
    ``"digits"``: :class:`Digits` (bundled; ``root`` and ``download`` are ignored and there is
    no ``"validation"`` mode). ``options`` go to the dataset class (``strict=False``,
    ``image_size=...``).

    Example::

        test = load_dataset("cifar100", "~/data", "test", download=True)
    """
    check_choice("name", name, DATASETS)
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
    if name == "mini-imagenet":
        return MiniImageNet(root, mode, transform=transform, download=download, **options)
    split = "paper" if name == "cifar100" else "cifar-fs"
    return CIFAR100Meta(root, mode, split=split, transform=transform, download=download, **options)


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
