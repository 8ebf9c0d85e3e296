"""The unit of work of every algorithm here: one few-shot task, and per-class selections of
its samples."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["Task", "per_class_prefix"]


class Task(NamedTuple):
    """One few-shot task: a support set to adapt on and a query set to score on.

    For classification, labels are class indices in ``[0, ways)``; for regression, float
    targets of any shape (one row per sample; with torch's element-wise losses such as
    ``mse_loss``, the model outputs' shape: ``(N, 1)`` for one output). A ``Task`` unpacks into the positional
    arguments of every ``meta_loss``: ``adml.meta_loss(*task)``.
    """

    support_inputs: Tensor
    support_labels: Tensor
    query_inputs: Tensor
    query_labels: Tensor


def per_class_prefix(labels: Tensor, fraction: float) -> Tensor:
    """Boolean mask selecting, for every class, its first ``round(fraction * count)`` samples.

    Deterministic and balanced, and computed on the labels' device without reading them on
    the host: e.g. ``fraction=0.4`` of 5 shots selects 2 per class. Leading dimensions of
    ``labels`` are batch dimensions (one mask per row of a stack of tasks).

    Example:
        >>> per_class_prefix(torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1]), 0.4).tolist()
        [True, True, True, True, False, False, False, False, False, False]
    """
    same = labels[..., :, None] == labels[..., None, :]
    earlier = same.tril(-1).sum(dim=-1)  # samples of the same class before this one
    count = same.sum(dim=-1, dtype=torch.float64)
    return earlier < torch.floor(fraction * count + 0.5)
