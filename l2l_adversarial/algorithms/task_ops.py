"""The operations a learner's per-task objective is written in, and their one-task version.

Every gradient-based learner states its meta-objective once, in
:meth:`~l2l_adversarial.algorithms.base.MetaLearner.task_objective`, as a short program over
operations on the task's sets: adapt parameters on sets, attack sets, score parameters on
sets, append adversarial rows to a set. Parameters are the meta-parameters theta where they
are ``None`` (the start of every inner loop, the model every "initial" attack targets), or
what :meth:`TaskOps.adapt` returned. :class:`SequentialOps` runs the operations on one task
(the reference, with ``torch.autograd``); the task runtime (:mod:`l2l_adversarial.runtime`)
runs the same program task after task or on a stack of tasks at once, so one definition
serves every engine.

Example:
    >>> import torch, l2l_adversarial as l2la
    >>> maml = l2la.MAML(torch.nn.Linear(4, 2), lr=0.1)
    >>> ops = SequentialOps(maml)
    >>> x, y = torch.rand(4, 4), torch.tensor([0, 1, 0, 1])
    >>> (fast,) = ops.adapt([(x, y, maml.lr)], steps=2)
    >>> (objective,) = ops.score([(fast, x, y)])
    >>> objective.loss.shape
    torch.Size([])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, NamedTuple, Protocol

import torch
from torch import Tensor

from l2l_adversarial.functional import Params, kl_divergence
from l2l_adversarial.task import per_class_prefix

if TYPE_CHECKING:
    from l2l_adversarial.attacks import Attack
    from l2l_adversarial.functional import FunctionalModel

__all__ = [
    "AdaptSet",
    "AttackSet",
    "Objective",
    "OpsLearner",
    "OutputSet",
    "PairScore",
    "PairSet",
    "RandomStarts",
    "ScoreSet",
    "SequentialOps",
    "TaskObjective",
    "TaskOps",
]

AdaptSet = tuple[Tensor, Tensor, float]
"""``(inputs, labels, step size)``: one inner loop."""
AttackSet = tuple[Tensor, Tensor, bool]
"""``(inputs, labels, is_query)``: one set to attack (query sets in the query memory format)."""
ScoreSet = tuple["Params | None", Tensor, Tensor]
"""``(params, inputs, labels)``: one query loss (``params`` ``None``: theta)."""
OutputSet = tuple["Params | None", Tensor]
"""``(params, inputs)``: the model's outputs on one query set."""
PairSet = tuple["Params | None", Tensor, Tensor, Tensor]
"""``(params, clean inputs, adversarial inputs, labels)``: one query set and its adversarial
copy, scored side by side."""


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


class PairScore(NamedTuple):
    """A query set and its adversarial copy scored at the same parameters."""

    clean: TaskObjective
    adversarial: TaskObjective
    divergence: Tensor
    """TRADES's ``KL(f(x) || f(x_adv))``, averaged over the rows
    (:func:`~l2l_adversarial.functional.kl_divergence`)."""


class RandomStarts(Protocol):
    """Where a task's random attack starts come from: ``generator(task, stream)`` is a context
    in which the attack draws from the returned generator (``None``: the attack's own)."""

    def generator(
        self, task: int, stream: tuple[int, ...]
    ) -> AbstractContextManager[torch.Generator | None]: ...


class OpsLearner(Protocol):
    """What the operations need of a learner: its model, attack, first-order setting and
    learn2learn's ``allow_unused``/``allow_nograd`` switches."""

    functional: FunctionalModel
    first_order: bool
    attack: Attack | None
    allow_unused: bool
    allow_nograd: bool

    def meta_parameters(self) -> Params:
        """theta, by name."""
        ...

    def attack_for(self, query: bool) -> Attack | None:
        """The attack that makes a query (or a support) set's adversarial copy."""
        ...


class _AttacksOwn:
    """Random starts from the attack's own generator, as it stands."""

    @contextmanager
    def generator(self, task: int, stream: tuple[int, ...]) -> Iterator[None]:
        yield None


class TaskOps(ABC):
    """The operations of a per-task objective, for ``learner`` (its model, loss, attack and
    first-order setting).

    Attacks on theta are kept in :attr:`recorded`; made with ``replay=`` (an earlier pass's
    :attr:`recorded`), the ops return those samples again instead of attacking theta:
    Algorithm 1's second update reuses the adversarial samples made before the first.
    Random starts come from ``starts`` (default: the attack's own generator), task
    ``first_task`` being the first (or only) task the ops run.
    """

    def __init__(
        self,
        learner: OpsLearner,
        replay: Sequence[Tensor] | None = None,
        starts: RandomStarts | None = None,
        first_task: int = 0,
    ) -> None:
        self.learner, self.first_task = learner, first_task
        self.recorded: list[Tensor] = []
        self._replay = None if replay is None else list(replay)
        self.starts: RandomStarts = _AttacksOwn() if starts is None else starts

    def inner_loop_rules(self) -> bool:
        """learn2learn's rules for an inner loop, from the learner: frozen parameters
        (``requires_grad=False``) raise ``RuntimeError`` unless ``allow_nograd`` (then they are
        not adapted); returns ``allow_unused`` (unused parameters allowed)."""
        learner = self.learner
        learner.functional.check_adaptable(bool(learner.allow_nograd), type(learner).__name__)
        return bool(learner.allow_unused)

    def perturb(
        self,
        sets: Sequence[AttackSet],
        against: Params | None = None,
        attack: Attack | None = None,
        stream: tuple[int, ...] = (),
    ) -> list[Tensor]:
        """Adversarial copies of the sets' inputs against the model at ``against`` (theta if
        ``None``) with ``attack`` (if ``None``, the learner's for query and for support sets:
        :meth:`OpsLearner.attack_for`), random starts from ``stream``."""
        if against is None and self._replay is not None:
            replayed, self._replay = self._replay[: len(sets)], self._replay[len(sets) :]
            return replayed
        adversarial = [torch.empty(0)] * len(sets)
        for chosen, members in self._attacks(sets, attack):
            made = self._perturb([sets[i] for i in members], against, chosen, stream)
            for i, samples in zip(members, made, strict=True):
                adversarial[i] = samples
        if against is None:
            self.recorded += adversarial
        return adversarial

    def _attacks(
        self, sets: Sequence[AttackSet], attack: Attack | None
    ) -> list[tuple[Attack, list[int]]]:
        """``(attack, indices of its sets)``: one call for all sets where one attack makes
        them, else one for the support sets and one for the query sets."""
        everything = list(range(len(sets)))
        if not sets:
            return []
        if attack is not None:
            return [(attack, everything)]
        support, query = self.learner.attack_for(False), self.learner.attack_for(True)
        if support is None or query is None:
            raise ValueError(f"{type(self.learner).__name__} has no attack: pass attack=")
        if support is query:
            return [(support, everything)]
        by_kind = [
            (chosen, [i for i in everything if sets[i][2] == is_query])
            for chosen, is_query in ((support, False), (query, True))
        ]
        return [(chosen, members) for chosen, members in by_kind if members]

    @abstractmethod
    def _perturb(
        self,
        sets: Sequence[AttackSet],
        against: Params | None,
        attack: Attack,
        stream: tuple[int, ...],
    ) -> list[Tensor]: ...

    @abstractmethod
    def adapt(
        self,
        sets: Sequence[AdaptSet],
        steps: int,
        start: Params | None = None,
        trajectory: bool = False,
    ) -> list[Params]:
        """Fast weights after ``steps`` inner steps on each set from ``start`` (theta if
        ``None``); with ``trajectory``, those after every step of the one set."""

    @abstractmethod
    def score(self, sets: Sequence[ScoreSet]) -> list[TaskObjective]:
        """Query loss and accuracy of each ``(params, inputs, labels)``."""

    @abstractmethod
    def outputs(self, sets: Sequence[OutputSet]) -> list[Tensor]:
        """The model's outputs at each ``(params, inputs)``, in the query memory format."""

    @abstractmethod
    def scored(self, outputs: Tensor, labels: Tensor) -> TaskObjective:
        """The loss and accuracy of :meth:`outputs` ``outputs``."""

    def score_pairs(self, sets: Sequence[PairSet]) -> list[PairScore]:
        """Each query set and its adversarial copy at ``params``: both losses and accuracies,
        and the KL divergence between the two outputs (TRADES's robustness term)."""
        outputs = self.outputs(
            [(p, clean) for p, clean, _, _ in sets] + [(p, adv) for p, _, adv, _ in sets]
        )
        return [
            PairScore(
                self.scored(clean, labels),
                self.scored(adversarial, labels),
                kl_divergence(adversarial, clean, reduction="none").mean(-1),
            )
            for (_, _, _, labels), clean, adversarial in zip(
                sets, outputs[: len(sets)], outputs[len(sets) :], strict=True
            )
        ]

    @abstractmethod
    def append_rows(
        self, inputs: Tensor, labels: Tensor, adversarial: Tensor, fraction: float
    ) -> tuple[Tensor, Tensor]:
        """The set followed by the adversarial copies of ``per_class_prefix(labels, fraction)``."""


class SequentialOps(TaskOps):
    """The operations on one task, with ``torch.autograd``: the reference engine."""

    def _params(self, params: Params | None) -> Params:
        return self.learner.meta_parameters() if params is None else params

    def _perturb(
        self,
        sets: Sequence[AttackSet],
        against: Params | None,
        attack: Attack,
        stream: tuple[int, ...],
    ) -> list[Tensor]:
        functional = self.learner.functional
        model = functional.at(self._params(against))
        adversarial = []
        for inputs, labels, query in sets:
            with self.starts.generator(self.first_task, stream) as generator:
                drawing = attack if generator is None else attack.drawing_from(generator)
                with functional.query_pass() if query else nullcontext():
                    x = functional.query_layout(inputs) if query else inputs
                    adversarial.append(drawing(model, x, labels))
        return adversarial

    def adapt(
        self,
        sets: Sequence[AdaptSet],
        steps: int,
        start: Params | None = None,
        trajectory: bool = False,
    ) -> list[Params]:
        allow_unused = self.inner_loop_rules() if steps > 0 else True
        functional, params = self.learner.functional, self._params(start)
        first_order = self.learner.first_order
        if trajectory:
            ((inputs, labels, lr),) = sets
            return functional.trajectory(
                params, inputs, labels, lr, steps, first_order, allow_unused
            )
        return [
            functional.adapt(params, x, y, lr, steps, first_order, allow_unused)
            for x, y, lr in sets
        ]

    def score(self, sets: Sequence[ScoreSet]) -> list[TaskObjective]:
        query_loss = self.learner.functional.query_loss
        return [
            TaskObjective(*query_loss(self._params(p), inputs, labels))
            for p, inputs, labels in sets
        ]

    def outputs(self, sets: Sequence[OutputSet]) -> list[Tensor]:
        functional = self.learner.functional
        return [functional.query_outputs(self._params(p), inputs) for p, inputs in sets]

    def scored(self, outputs: Tensor, labels: Tensor) -> TaskObjective:
        return TaskObjective(*self.learner.functional.scored(outputs, labels))

    def append_rows(
        self, inputs: Tensor, labels: Tensor, adversarial: Tensor, fraction: float
    ) -> tuple[Tensor, Tensor]:
        if fraction < 1:  # boolean indexing: one host read of the mask's count
            chosen = per_class_prefix(labels, fraction)
            adversarial, extra = adversarial[chosen], labels[chosen]
        else:
            extra = labels
        return torch.cat([inputs, adversarial]), torch.cat([labels, extra])
