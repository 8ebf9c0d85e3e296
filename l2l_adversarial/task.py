"""The unit of work of every algorithm here: one few-shot task."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Task(NamedTuple):
    """One N-way few-shot task: a support set to adapt on and a query set to score on.

    Labels are class indices in ``[0, ways)``. A ``Task`` unpacks into the positional
    arguments of every ``meta_loss``: ``adml.meta_loss(*task)``.
    """

    support_inputs: Tensor
    support_labels: Tensor
    query_inputs: Tensor
    query_labels: Tensor
