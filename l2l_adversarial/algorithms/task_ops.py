"""The operations a learner's per-task objective is written in, and their one-task version.

Every gradient-based learner states its meta-objective once, in
:meth:`~l2l_adversarial.algorithms.base.MetaLearner.task_objective`, as a short program over
four operations on the task's sets: adapt parameters on sets, attack sets, score parameters on
sets, append adversarial rows to a set. :class:`SequentialOps` runs them on one task (the
reference, with ``torch.autograd``); :class:`l2l_adversarial.engines.BatchedOps` runs the same
program on a stack of tasks at once (``torch.func.vmap``), so one definition serves both
engines.

Attacks against theta are recorded; an ops object made with ``replay=`` returns those
samples again instead of attacking (Algorithm 1's second update reuses the adversarial samples
made before the first).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import Tensor

from l2l_adversarial.functional import Params
from l2l_adversarial.task import per_class_prefix

if TYPE_CHECKING:
    from l2l_adversarial.algorithms.base import AdversarialMetaLearner, MetaLearner

__all__ = [
    "AdaptSet",
    "AttackSet",
    "Objective",
    "ScoreSet",
    "SequentialOps",
    "TaskObjective",
    "TaskOps",
]

AdaptSet = tuple[Tensor, Tensor, float]
"""``(inputs, labels, step size)``: one inner loop."""
AttackSet = tuple[Tensor, Tensor, bool]
"""``(inputs, labels, is_query)``: one set to attack (query sets in the query memory format)."""
ScoreSet = tuple[Params, Tensor, Tensor]
"""``(params, inputs, labels)``: one query loss."""


class Objective(Protocol):
    """What a per-task objective gives the engines: a named tuple of tensors with these two."""

    @property
    def total(self) -> Tensor:
        """The value the meta-update descends, differentiable in theta."""
        ...

    @property
    def accuracy(self) -> Tensor:
        """Query accuracy (detached; NaN where it means nothing)."""
        ...

    def __iter__(self) -> Iterator[Tensor]: ...


class TaskObjective(NamedTuple):
    """One task's meta-objective (differentiable in theta) and its query accuracy (detached;
    NaN where accuracy means nothing, e.g. regression)."""

    loss: Tensor
    accuracy: Tensor

    @property
    def total(self) -> Tensor:
        """The value the meta-update descends (here: :attr:`loss`)."""
        return self.loss


class TaskOps(ABC):
    """The operations of a per-task objective; ``theta`` is the learner's meta-parameters."""

    batched: bool = False

    def __init__(self, learner: MetaLearner, replay: Sequence[Tensor] | None = None) -> None:
        self.learner = learner
        self.theta: Params = learner.meta_parameters()
        self.recorded: list[Tensor] = []
        self._replay = None if replay is None else list(replay)

    @property
    def replaying(self) -> bool:
        """Whether attacks against theta return recorded samples."""
        return self._replay is not None

    def perturb(self, params: Params, sets: Sequence[AttackSet]) -> list[Tensor]:
        """Adversarial copies of the sets' inputs against the model at ``params``."""
        if params is self.theta and self._replay is not None:
            replayed, self._replay = self._replay[: len(sets)], self._replay[len(sets) :]
            return replayed
        adversarial = self._perturb(params, sets)
        if params is self.theta:
            self.recorded += adversarial
        return adversarial

    def record(self, adversarial: Tensor) -> None:
        """Record an attack on theta made outside :meth:`perturb` (ADML's shared pass)."""
        self.recorded.append(adversarial)

    @abstractmethod
    def _perturb(self, params: Params, sets: Sequence[AttackSet]) -> list[Tensor]: ...

    @abstractmethod
    def adapt(self, params: Params, sets: Sequence[AdaptSet], steps: int) -> list[Params]:
        """Fast weights after ``steps`` inner steps from ``params`` on each set."""

    @abstractmethod
    def score(self, sets: Sequence[ScoreSet]) -> list[TaskObjective]:
        """Query loss and accuracy of each ``(params, inputs, labels)``."""

    @abstractmethod
    def append_rows(
        self, inputs: Tensor, labels: Tensor, adversarial: Tensor, fraction: float
    ) -> tuple[Tensor, Tensor]:
        """The set followed by the adversarial copies of ``per_class_prefix(labels, fraction)``."""


class SequentialOps(TaskOps):
    """The operations on one task, with ``torch.autograd``: the reference engine."""

    learner: AdversarialMetaLearner

    def _perturb(self, params: Params, sets: Sequence[AttackSet]) -> list[Tensor]:
        learner = self.learner
        return [
            (learner.perturb_query if query else learner.perturb)(params, inputs, labels)
            for inputs, labels, query in sets
        ]

    def adapt(self, params: Params, sets: Sequence[AdaptSet], steps: int) -> list[Params]:
        return [
            self.learner.adapt_functional(params, inputs, labels, lr, steps)
            for inputs, labels, lr in sets
        ]

    def score(self, sets: Sequence[ScoreSet]) -> list[TaskObjective]:
        query_loss = self.learner.functional.query_loss
        return [TaskObjective(*query_loss(p, inputs, labels)) for p, inputs, labels in sets]

    def append_rows(
        self, inputs: Tensor, labels: Tensor, adversarial: Tensor, fraction: float
    ) -> tuple[Tensor, Tensor]:
        if fraction < 1:  # boolean indexing: one host read of the mask's count
            chosen = per_class_prefix(labels, fraction)
            adversarial, extra = adversarial[chosen], labels[chosen]
        else:
            extra = labels
        return torch.cat([inputs, adversarial]), torch.cat([labels, extra])
