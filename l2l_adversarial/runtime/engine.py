"""The meta-iteration of every gradient-based learner, task by task or batched.

:func:`meta_step` runs one meta-iteration (lines 3-11 of Algorithm 1 for ADML; the joint
meta-update for every learner) on a meta-batch. A learner states one task's objective in
:meth:`~l2l_adversarial.algorithms.base.MetaLearner.task_objective`; the engine decides how
many tasks run at once:

* ``"sequential"``: task after task with
  :class:`~l2l_adversarial.algorithms.task_ops.SequentialOps` (``torch.autograd``), one task's
  graph in memory at a time. The reference.
* ``"vmap"`` (experimental: no GPU has measured it yet): the same objective on a stack of
  tasks with :class:`~l2l_adversarial.runtime.stacked_ops.StackedOps`, in chunks of
  ``chunk_size`` tasks (all by default); a chunk that runs out of device memory is halved and
  the meta-iteration run again (:func:`fitting_chunk_size`).
* ``"auto"`` (default): ``"sequential"``. On the CPU the batched (grouped) convolutions are
  slower than the loop; no GPU measurement has decided otherwise yet.

Every task's random attack starts come from its own stream
(:class:`~l2l_adversarial.runtime.streams.GeneratorStates`), so all engines give the same
samples, and the same meta-gradient to floating-point tolerance (``tests/test_engines.py``).
The vmap engine needs tasks of equal shapes.

Nothing in a meta-iteration reads device values on the host: the meta-batch's value checks
(finite inputs, label range, the attack's data range) are one host read before it starts
(:func:`l2l_adversarial.validation.check_meta_batch`; off inside
``validation.value_checks(False)``), and the returned losses stay on the device.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from operator import attrgetter
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from l2l_adversarial.algorithms.base import MetaLearner
from l2l_adversarial.algorithms.task_ops import SequentialOps, TaskObjective, TaskOps
from l2l_adversarial.runtime.layouts import explain_randomness, vmap_obstacle
from l2l_adversarial.runtime.stacked_ops import StackedOps
from l2l_adversarial.runtime.streams import GeneratorStates
from l2l_adversarial.task import Task
from l2l_adversarial.validation import (
    check_choice,
    check_meta_batch,
    check_task_metadata,
    value_checks,
)

__all__ = [
    "ENGINES",
    "check_stackable",
    "fitting_chunk_size",
    "meta_batch_objective",
    "meta_step",
    "resolve_engine",
    "vmap_obstacle",
]

ENGINES = ("auto", "sequential", "vmap")
EMPTY_BATCH = "tasks is empty: a meta-batch needs at least one task"


class _Stepper(Protocol):
    def zero_grad(self) -> None: ...
    def step(self) -> Any: ...


# -- choosing an engine --------------------------------------------------------------------
def resolve_engine(learner: object, engine: str = "auto") -> str:
    """``"sequential"`` or ``"vmap"``: what ``engine`` means for ``learner``.

    ``"auto"`` is ``"sequential"`` (see the module docstring). Raises ``ValueError`` for an
    unknown name, or for ``"vmap"`` on a learner or model it cannot run.

    Example:
        >>> import l2l_adversarial as l2la
        >>> resolve_engine(l2la.MAML(l2la.CNN4(ways=3), lr=0.1), "vmap")
        'vmap'
    """
    check_choice("engine", engine, ENGINES)
    if engine != "vmap":
        return "sequential"
    functional = getattr(learner, "functional", None)
    if functional is None:
        raise ValueError(
            f"engine='vmap' runs gradient-based learners (MAML, ADML, MAML-AD, AQ), not "
            f"{learner!r}"[:300]
            + "; use engine='sequential' (or 'auto')"
        )
    obstacle = vmap_obstacle(functional.network)
    if obstacle:
        raise ValueError(
            f"engine='vmap' cannot run {type(functional.network).__name__}: {obstacle}. "
            "Use engine='sequential' (or 'auto')."
        )
    return engine


# -- the meta-iteration ----------------------------------------------------------------------
def meta_step(
    learner: nn.Module,
    tasks: Iterable[Task],
    optimizer: _Stepper,
    clean_optimizer: _Stepper | None = None,
    *,
    steps: int | None = None,
    engine: str = "auto",
    chunk_size: int | None = None,
) -> Any:
    """One meta-iteration over a meta-batch; returns the mean objective (detached, on the
    parameters' device: reading it is the caller's choice).

    With one ``optimizer`` (learning rate beta), theta takes one step on the mean over the
    tasks of the learner's objective (for ADML ``L(theta'_adv, D'_c) + L(theta'_c, D'_adv)``).
    With ``clean_optimizer`` too (ADML only), line 11 runs as the paper writes it:
    ``optimizer`` (beta1) steps on ``L(theta'_adv, D'_c)``, then both branches are recomputed
    at the updated theta and ``clean_optimizer`` (beta2) steps on ``L(theta'_c, D'_adv)``; the
    adversarial samples made against theta are generated once, before either step.

    ``engine`` and ``chunk_size`` (the vmap engine's tasks per batch; all by default): see the
    module docstring. Learners that are not gradient-based (Matching Networks) run their
    ``loss_and_accuracy`` task by task.

    Example:
        >>> objective = meta_step(adml, tasks, optimizer)  # doctest: +SKIP
        >>> beta1_then_beta2 = meta_step(adml, tasks, beta1, beta2)  # doctest: +SKIP
    """
    check_choice("engine", engine, ENGINES)
    if not isinstance(learner, MetaLearner):
        if not hasattr(learner, "loss_and_accuracy"):
            raise TypeError(
                "learner must be an l2l_adversarial learner (MAML, ADML, MAMLAD, "
                f"AdversarialQuerying, MatchingNetwork), got {type(learner).__name__}"
            )
        resolve_engine(learner, engine)
        return _plain_step(learner, tasks, optimizer)
    batch = _MetaBatch(learner, tasks, resolve_engine(learner, engine), steps, chunk_size)
    if clean_optimizer is None:
        return _descend(batch, optimizer, attrgetter("total"))
    if learner.two_step_update is None:
        raise TypeError(
            f"clean_optimizer: the two-step update of Algorithm 1 is ADML's; "
            f"{type(learner).__name__} takes one optimizer"
        )
    (first_loss, first_accuracy), (second_loss, _) = learner.two_step_update
    first = _descend(batch, optimizer, attrgetter(first_loss))
    second = _descend(batch, clean_optimizer, attrgetter(second_loss), replay=True)
    return second._replace(
        **{first_loss: getattr(first, first_loss), first_accuracy: getattr(first, first_accuracy)}
    )


def meta_batch_objective(
    learner: MetaLearner,
    tasks: Iterable[Task],
    steps: int | None = None,
    engine: str = "auto",
    chunk_size: int | None = None,
) -> Any:
    """The mean over a meta-batch of ``learner.task_objective``, differentiable in theta
    (every task's graph kept until the caller's backward pass).

    Example:
        >>> meta_batch_objective(adml, tasks, engine="vmap").total.backward()  # doctest: +SKIP
    """
    batch = _MetaBatch(learner, tasks, resolve_engine(learner, engine), steps, chunk_size)
    parts = list(batch.objectives())
    weights = [weight for _, weight in parts]
    columns = zip(*(objective for objective, _ in parts), strict=True)
    return type(parts[0][0])(
        *(torch.stack([w * v for w, v in zip(weights, c, strict=True)]).sum(0) for c in columns)
    )


def _descend(
    batch: _MetaBatch,
    optimizer: _Stepper,
    select: Callable[[Any], Tensor],
    replay: bool = False,
) -> Any:
    """Backpropagate ``select`` of each weighted objective of ``batch`` as it comes (one graph
    alive at a time), take one optimizer step; returns the weighted mean objective, detached.

    If a vmap chunk runs out of device memory before the step, the pass starts again in
    chunks half as large (the attack streams rewound; the learner keeps the smaller size,
    :func:`fitting_chunk_size`), down to one task per chunk."""
    while True:
        streams = batch.streams.snapshot()
        optimizer.zero_grad()
        try:
            kind, sums = _backward_each(batch, select, replay)
            break
        except torch.OutOfMemoryError:
            if batch.engine != "vmap" or batch.chunk_size == 1 or replay:
                raise
        # out of the except block: its traceback (and the graphs it held) is gone
        batch.streams.restore(streams)
        batch.shrink_chunks()
    optimizer.step()
    return kind(*sums)


def _backward_each(
    batch: _MetaBatch, select: Callable[[Any], Tensor], replay: bool
) -> tuple[type, list[Tensor]]:
    sums: list[Tensor] = []
    kind: type | None = None
    for objective, weight in batch.objectives(replay):
        (weight * select(objective)).backward()
        values = [weight * v.detach() for v in objective]
        sums = values if not sums else [s + v for s, v in zip(sums, values, strict=True)]
        kind = type(objective)
    assert kind is not None  # _MetaBatch refuses an empty meta-batch
    return kind, sums


_FITTING_CHUNKS: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def fitting_chunk_size(learner: nn.Module) -> int | None:
    """The vmap engine's tasks per chunk for ``learner`` after a meta-batch ran out of device
    memory (later meta-batches start from it), or ``None`` if none did.

    Example:
        >>> import l2l_adversarial as l2la
        >>> fitting_chunk_size(l2la.MAML(torch.nn.Linear(4, 2), lr=0.1)) is None
        True
    """
    return _FITTING_CHUNKS.get(learner)


def _plain_step(learner: Any, tasks: Iterable[Task], optimizer: _Stepper) -> TaskObjective:
    """Learners without an inner loop (Matching Networks): ``loss_and_accuracy`` task by task."""
    checked = [Task(*task) for task in tasks]
    if not checked:
        raise ValueError(EMPTY_BATCH)
    optimizer.zero_grad()
    losses, accuracies = [], []
    for task in checked:
        loss, accuracy = learner.loss_and_accuracy(*task)
        (loss / len(checked)).backward()
        losses.append(loss.detach())
        accuracies.append(accuracy.detach())
    optimizer.step()
    return TaskObjective(torch.stack(losses).mean(), torch.stack(accuracies).float().mean())


class _MetaBatch:
    """A checked meta-batch and its objectives, task by task or in stacked chunks."""

    def __init__(
        self,
        learner: MetaLearner,
        tasks: Iterable[Task],
        engine: str,
        steps: int | None,
        chunk_size: int | None,
    ) -> None:
        self.learner, self.engine, self.steps = learner, engine, learner.resolve_steps(steps)
        self.streams = GeneratorStates(getattr(learner.attack, "generator", None))
        module, classification = learner.functional.network, learner.classification
        self.tasks: list[Task] = []
        for index, task in enumerate(tasks):
            self.streams.capture()
            self.tasks.append(
                check_task_metadata(task, classification, module, where=f"task {index}")
            )
        if not self.tasks:
            raise ValueError(EMPTY_BATCH)
        data_range = None if learner.attack is None else learner.attack.input_range
        check_meta_batch(self.tasks, classification, data_range)
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
        count = len(self.tasks)
        self.chunk_size = chunk_size or min(count, _FITTING_CHUNKS.get(learner, count))
        if engine == "vmap":
            check_stackable(self.tasks)
        self.recorded: list[list[Tensor]] = []

    def shrink_chunks(self) -> None:
        """Halve the vmap engine's chunks after the device ran out of memory (and remember
        the size for this learner's later meta-batches)."""
        smaller = (self.chunk_size + 1) // 2
        warnings.warn(
            f"engine='vmap': {self.chunk_size} tasks at once did not fit in device memory; "
            f"running chunks of {smaller} (set chunk_size= to choose)",
            ResourceWarning,
            stacklevel=4,
        )
        self.chunk_size = _FITTING_CHUNKS[self.learner] = smaller
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def objectives(self, replay: bool = False) -> Iterator[tuple[Any, float]]:
        """``(objective, weight)`` per task (sequential) or per chunk (vmap, objective
        averaged over the chunk); the weights sum to 1. ``replay`` reuses the attacks on
        theta of the previous pass."""
        count = len(self.tasks)
        recorded = self.recorded if replay else []
        if not replay:
            self.recorded = recorded
        with value_checks(False):
            for chunk, (start, task) in enumerate(self._runs()):
                ops: TaskOps = (SequentialOps if self.engine == "sequential" else StackedOps)(
                    self.learner, recorded[chunk] if replay else None, self.streams, start
                )
                with explain_randomness(self.learner.functional.network):
                    objective = self.learner.task_objective(task, self.steps, ops)
                if not replay:
                    recorded.append(ops.recorded)
                if self.engine == "sequential":
                    yield objective, 1 / count
                else:  # the chunk's mean, weighted by its share of the tasks
                    mean = type(objective)(*(v.mean(0) for v in objective))
                    yield mean, task.support_labels.shape[0] / count

    def _runs(self) -> Iterator[tuple[int, Task]]:
        """``(index of the first task, task or stack of tasks)`` for each run of the engine."""
        if self.engine == "sequential":
            yield from enumerate(self.tasks)
            return
        for start in range(0, len(self.tasks), self.chunk_size):
            tasks = self.tasks[start : start + self.chunk_size]
            yield start, Task(*(torch.stack(list(sets)) for sets in zip(*tasks, strict=True)))


# -- helpers -------------------------------------------------------------------------------
def check_stackable(tasks: Sequence[Task], names: Sequence[str] | None = None) -> None:
    """Refuse tasks ``engine='vmap'`` cannot stack: their tensor shapes must be equal.

    Example:
        >>> import torch
        >>> task = Task(torch.rand(2, 3), torch.arange(2), torch.rand(4, 3), torch.arange(4))
        >>> check_stackable([task, task])  # equal shapes: nothing to say
    """
    names = names or [f"task {index}" for index in range(len(tasks))]
    shapes = [tuple(tuple(t.shape) for t in task) for task in tasks]
    for name, task_shapes in zip(names, shapes, strict=True):
        if task_shapes != shapes[0]:
            raise ValueError(
                f"engine='vmap' stacks the tasks, so their shapes must be equal, but {name} has "
                f"tensor shapes {task_shapes} and {names[0]} {shapes[0]}. Use "
                "engine='sequential' (or 'auto')."
            )
