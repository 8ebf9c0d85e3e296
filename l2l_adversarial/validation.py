"""Input checks shared by the attacks and the algorithms: fail early, name the fix."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_finite", "check_labels", "check_task", "check_choice"]


def check_finite(name: str, tensor: Tensor) -> None:
    """Raise ``ValueError`` if ``tensor`` holds NaN or infinity."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{name} holds {bad} non-finite value(s) (NaN or inf); clean or re-load the data"
        )


def check_labels(name: str, labels: Tensor, ways: int) -> None:
    """Raise unless ``labels`` is a 1-D integer tensor with values in ``[0, ways)``."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"{name} must hold integer class indices (torch.long), got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(
            f"{name} must be 1-D (one class index per sample), got shape {tuple(labels.shape)}"
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= ways):
        raise ValueError(
            f"{name} must lie in [0, {ways}) for a {ways}-way task, got values in "
            f"[{int(labels.min())}, {int(labels.max())}]; relabel each task's classes 0..ways-1 "
            "(learn2learn's RemapLabels transform does this)"
        )


def check_choice(name: str, value: object, accepted: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``accepted``."""
    if value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, accepted))}; got {value!r}")


def check_task(
    support_inputs: Tensor,
    support_labels: Tensor,
    query_inputs: Tensor,
    query_labels: Tensor,
    ways: int | None = None,
) -> int:
    """Validate one few-shot task and return its number of ways.

    ``ways`` defaults to the number of distinct support labels; every label (support and
    query) must lie in ``[0, ways)``.
    """
    for name, inputs, labels in (
        ("support", support_inputs, support_labels),
        ("query", query_inputs, query_labels),
    ):
        check_finite(f"{name}_inputs", inputs)
        if not isinstance(labels, Tensor):
            raise TypeError(f"{name}_labels must be a torch.Tensor, got {type(labels).__name__}")
        if inputs.dim() < 1 or labels.dim() != 1 or inputs.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{name}_inputs has shape {tuple(inputs.shape)} and {name}_labels shape "
                f"{tuple(labels.shape)}: expected (N, ...) inputs with N labels"
            )
        if inputs.shape[0] == 0:
            raise ValueError(f"{name} set is empty: a task needs at least one {name} sample")
    if support_inputs.shape[1:] != query_inputs.shape[1:]:
        raise ValueError(
            f"support samples have shape {tuple(support_inputs.shape[1:])} but query samples "
            f"{tuple(query_inputs.shape[1:])}: both sets must come from the same data"
        )
    if ways is None:
        ways = int(torch.unique(support_labels).numel())
    check_labels("support_labels", support_labels, ways)
    check_labels("query_labels", query_labels, ways)
    return ways
