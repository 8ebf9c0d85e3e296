"""The meta-iteration of every gradient-based learner, task by task or batched.

:func:`meta_step` runs one meta-iteration (lines 3-11 of Algorithm 1 for ADML; the joint
meta-update for every learner) on a meta-batch. A learner states one task's objective in
:meth:`~l2l_adversarial.algorithms.base.MetaLearner.task_objective`; the engine decides how
many tasks run at once:

* ``"sequential"``: task after task with :class:`~l2l_adversarial.algorithms.SequentialOps`
  (``torch.autograd``), one task's graph in memory at a time. The reference.
* ``"vmap"``: the same objective on a stack of tasks with :class:`BatchedOps`: each inner
  loop is one pass for all tasks (for ADML, for the ``2T`` (branch, task) pairs), each query
  loss one pass, each attack one call over the meta-batch (losses and BatchNorm statistics
  stay per task and per set; each task's random start from its own generator stream; attacks
  other than FGSM, FFGSM and PGD run task by task, see :func:`batches_attack`).
  :mod:`l2l_adversarial.stacked` runs the stack: CNN4, MLP and ``nn.Sequential`` nets of
  standard layers folded into one grouped network (plain autograd), any other model with
  ``torch.func.vmap`` over ``grad``. On a GPU this launches
  each layer's kernels once per meta-batch instead of once per task. ``chunk_size`` bounds
  how many tasks run at once (memory); a chunk that runs out of device memory is halved and
  the meta-iteration run again (:func:`fitting_chunk_size`).
* ``"auto"`` (default): ``"sequential"``. No GPU measurement has shown vmap to be faster
  yet (none was available to this project); on the CPU the vmapped (grouped) convolutions
  are slower than the loop.

All engines give the same meta-gradient to floating-point tolerance (``tests/test_engines.py``).
The vmap engine needs tasks of equal shapes. Where it takes second derivatives, batch and
layer normalisation run as primitive operations: PyTorch's batching rules for the fused
kernels give wrong second derivatives (pytorch/functorch#534).

Nothing in a meta-iteration reads device values on the host: the meta-batch's value checks
(finite inputs, label range, the attack's data range) are one host read before it starts
(:func:`l2l_adversarial.validation.check_meta_batch`; off inside
``validation.value_checks(False)``), and the returned losses stay on the device.

Example:
    >>> import torch, l2l_adversarial as l2la
    >>> from l2l_adversarial import engines
    >>> adml = l2la.ADML(l2la.CNN4(ways=3, in_channels=1, hidden=4, image_size=16), lr=0.1)
    >>> tasks = [l2la.Task(torch.rand(3, 1, 16, 16), torch.arange(3),
    ...                    torch.rand(6, 1, 16, 16), torch.arange(3).repeat(2))] * 2
    >>> optimizer = torch.optim.Adam(adml.parameters(), lr=1e-3)
    >>> objective = engines.meta_step(adml, tasks, optimizer, engine="vmap")
    >>> objective.total.shape  # the mean over the meta-batch, on the device, detached
    torch.Size([])
"""

from __future__ import annotations

import copy
import itertools
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn
from torch.func import vmap

from l2l_adversarial import stacked
from l2l_adversarial.algorithms.adml import ADML, ADMLObjective
from l2l_adversarial.algorithms.base import AdversarialMetaLearner, MetaLearner
from l2l_adversarial.algorithms.matching_networks import MatchingNetwork
from l2l_adversarial.algorithms.task_ops import (
    AdaptSet,
    AttackSet,
    ScoreSet,
    SequentialOps,
    TaskObjective,
    TaskOps,
)
from l2l_adversarial.attacks import FFGSM, FGSM, PGD, Attack
from l2l_adversarial.functional import FunctionalModel, Params
from l2l_adversarial.stacked import ROW_MEAN_LOSSES, vmap_obstacle
from l2l_adversarial.task import Task, per_class_prefix
from l2l_adversarial.validation import (
    check_choice,
    check_meta_batch,
    check_task_metadata,
    value_checks,
)

__all__ = [
    "ENGINES",
    "BatchedOps",
    "attack_stacked",
    "batches_attack",
    "fitting_chunk_size",
    "meta_batch_objective",
    "meta_step",
    "random_start",
    "resolve_engine",
    "vmap_obstacle",
]

ENGINES = ("auto", "sequential", "vmap")
EMPTY_BATCH = "tasks is empty: a meta-batch needs at least one task"

Objective = TypeVar("Objective", TaskObjective, ADMLObjective)


class _Stepper(Protocol):
    def zero_grad(self) -> None: ...
    def step(self) -> Any: ...


# -- choosing an engine --------------------------------------------------------------------
def resolve_engine(learner: nn.Module, engine: str = "auto") -> str:
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
    if not isinstance(learner, MetaLearner):
        raise ValueError(
            f"engine='vmap' runs gradient-based learners (MAML, ADML, MAML-AD, AQ), not "
            f"{type(learner).__name__}; use engine='sequential' (or 'auto')"
        )
    obstacle = vmap_obstacle(learner.functional.module)
    if obstacle:
        raise ValueError(
            f"engine='vmap' cannot run {type(learner.functional.module).__name__}: {obstacle}. "
            "Use engine='sequential' (or 'auto')."
        )
    return engine


def batches_attack(attack: Attack) -> bool:
    """Whether the vmap engine attacks a whole stack of tasks in one call: FGSM, FFGSM and
    PGD (each task's random start, where there is one, drawn beforehand from the generator
    state the task had when it was taken from ``tasks``, so an iterator that seeds the
    attack's generator before yielding each task gets the sequential engine's samples);
    other attacks run task by task.

    Example:
        >>> batches_attack(FGSM(eps=2 / 255)), batches_attack(PGD(eps=2 / 255))
        (True, True)
    """
    return type(attack) in (FGSM, FFGSM, PGD)


def random_start(attack: Attack) -> bool:
    """Whether ``attack`` (one that :func:`batches_attack`) starts from random noise.

    Example:
        >>> random_start(PGD(eps=2 / 255)), random_start(PGD(eps=2 / 255, random_start=False))
        (True, False)
    """
    return type(attack) is FFGSM or (type(attack) is PGD and attack.random_start)


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
    if isinstance(learner, MatchingNetwork):
        resolve_engine(learner, engine)
        return _plain_step(learner, tasks, optimizer)
    if not isinstance(learner, MetaLearner):
        raise TypeError(
            "learner must be an l2l_adversarial learner (MAML, ADML, MAMLAD, "
            f"AdversarialQuerying, MatchingNetwork), got {type(learner).__name__}"
        )
    batch = _MetaBatch(learner, tasks, resolve_engine(learner, engine), steps, chunk_size)
    if clean_optimizer is None:
        return _descend(batch, optimizer, lambda o: o.total)
    if not isinstance(learner, ADML):
        raise TypeError(
            f"clean_optimizer: the two-step update of Algorithm 1 is ADML's; "
            f"{type(learner).__name__} takes one optimizer"
        )
    first = _descend(batch, optimizer, lambda o: o.adversarial_support_loss)
    second = _descend(batch, clean_optimizer, lambda o: o.clean_support_loss, replay=True)
    return ADMLObjective(
        first.adversarial_support_loss,
        second.clean_support_loss,
        first.adversarial_support_accuracy,
        second.clean_support_accuracy,
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


def _plain_step(
    learner: MatchingNetwork, tasks: Iterable[Task], optimizer: _Stepper
) -> TaskObjective:
    """Matching Networks: no inner loop, ``loss_and_accuracy`` task by task."""
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


class _AttackStreams:
    """The attack generator's state for each task, taken when the task left ``tasks``; a
    task's attacks draw from (and advance) its own stream, whatever the engine."""

    def __init__(self, learner: MetaLearner) -> None:
        attack = getattr(learner, "attack", None)
        self.generator: torch.Generator | None = getattr(attack, "generator", None)
        self.states: list[Tensor] = []

    def capture(self) -> None:
        if self.generator is not None:
            self.states.append(self.generator.get_state())

    def snapshot(self) -> list[Tensor]:
        return list(self.states)

    def restore(self, states: list[Tensor]) -> None:
        self.states = list(states)

    @contextmanager
    def task(self, index: int) -> Iterator[None]:
        if self.generator is None:
            yield
            return
        self.generator.set_state(self.states[index])
        try:
            yield
        finally:
            self.states[index] = self.generator.get_state()


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
        self.streams = _AttackStreams(learner)
        module, classification = learner.functional.module, learner.classification
        self.tasks: list[Task] = []
        for index, task in enumerate(tasks):
            self.streams.capture()
            self.tasks.append(
                check_task_metadata(task, classification, module, where=f"task {index}")
            )
        if not self.tasks:
            raise ValueError(EMPTY_BATCH)
        attack = getattr(learner, "attack", None)
        data_range = None if attack is None else attack.input_range
        check_meta_batch(self.tasks, classification, data_range)
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be an integer >= 1 or None, got {chunk_size!r}")
        count = len(self.tasks)
        self.chunk_size = chunk_size or min(count, _FITTING_CHUNKS.get(learner, count))
        if engine == "vmap":
            _check_stackable(self.tasks)
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
            if self.engine == "sequential":
                for index, task in enumerate(self.tasks):
                    ops: TaskOps = SequentialOps(self.learner, recorded[index] if replay else None)
                    with self.streams.task(index):
                        objective = self.learner.task_objective(task, self.steps, ops)
                    if not replay:
                        recorded.append(ops.recorded)
                    yield objective, 1 / count
                return
            for chunk, start in enumerate(range(0, count, self.chunk_size)):
                tasks = self.tasks[start : start + self.chunk_size]
                stacked = Task(*(torch.stack(list(sets)) for sets in zip(*tasks, strict=True)))
                ops = BatchedOps(
                    self.learner, self.streams, start, recorded[chunk] if replay else None
                )
                objective = self.learner.task_objective(stacked, self.steps, ops)
                if not replay:
                    recorded.append(ops.recorded)
                yield type(objective)(*(v.mean(0) for v in objective)), len(tasks) / count


# -- the vmap engine -----------------------------------------------------------------------
class BatchedOps(TaskOps):
    """The operations on a stack of tasks (leading dimension ``T``), run by
    :mod:`l2l_adversarial.stacked`.

    Parameters other than theta carry the task dimension; losses and accuracies come back as
    ``[T]`` tensors. Sets of equal shapes in one call run in one pass.
    """

    batched = True
    learner: AdversarialMetaLearner

    def __init__(
        self,
        learner: MetaLearner,
        streams: _AttackStreams,
        offset: int,
        replay: Sequence[Tensor] | None = None,
    ) -> None:
        super().__init__(learner, replay)
        self.streams, self.offset = streams, offset

    def _in_dim(self, params: Params) -> int | None:
        return None if params is self.theta else 0

    def adapt(self, params: Params, sets: Sequence[AdaptSet], steps: int) -> list[Params]:
        if steps == 0:
            return [params for _ in sets]
        groups = _groups([(inputs.shape, labels.shape) for inputs, labels, _ in sets])
        adapted: list[Params] = [{} for _ in sets]
        for members in groups:
            inputs = _joined([sets[i][0] for i in members])
            labels = _joined([sets[i][1] for i in members])
            tasks = sets[members[0]][0].shape[0]
            rates = {sets[i][2] for i in members}
            step_sizes: Tensor | float = (
                rates.pop()
                if len(rates) == 1
                else _joined(
                    [
                        torch.full((tasks,), sets[i][2], dtype=inputs.dtype, device=inputs.device)
                        for i in members
                    ]
                )
            )
            start, per_task = params, self._in_dim(params) == 0
            if per_task and len(members) > 1:
                start = {n: torch.cat([p] * len(members)) for n, p in params.items()}
            (result,) = stacked.adapt(
                self.learner.functional, start, per_task, inputs, labels, step_sizes, steps,
                self.learner.first_order,
            )  # fmt: skip
            for slot, i in enumerate(members):
                adapted[i] = {n: p[slot * tasks : (slot + 1) * tasks] for n, p in result.items()}
        return adapted

    def score(self, sets: Sequence[ScoreSet]) -> list[TaskObjective]:
        if len(sets) > 1 and all(self._in_dim(p) == 0 for p, _, _ in sets):
            groups = _groups([(x.shape, y.shape) for _, x, y in sets])
        else:
            groups = [[i] for i in range(len(sets))]
        scored: list[TaskObjective] = [TaskObjective(torch.empty(0), torch.empty(0))] * len(sets)
        for members in groups:
            params = sets[members[0]][0]
            if len(members) > 1:
                params = {n: torch.cat([sets[i][0][n] for i in members]) for n in params}
            inputs = _joined([sets[i][1] for i in members])
            labels = _joined([sets[i][2] for i in members])
            losses, accuracies = stacked.losses(
                self.learner.functional, params, self._in_dim(params) == 0, inputs, labels
            )
            tasks = sets[members[0]][1].shape[0]
            for slot, i in enumerate(members):
                part = slice(slot * tasks, (slot + 1) * tasks)
                scored[i] = TaskObjective(losses[part], accuracies[part])
        return scored

    def _perturb(self, params: Params, sets: Sequence[AttackSet]) -> list[Tensor]:
        learner, attack = self.learner, self.learner.attack
        tasks = sets[0][0].shape[0]
        batched = self._in_dim(params) == 0
        if batches_attack(attack):
            if random_start(attack):  # each task's starts from its own stream, as in sequence
                noise = []
                for t in range(tasks):
                    with self.streams.task(self.offset + t):
                        noise += [
                            attack.uniform_noise(x[t], self.streams.generator) for x, _, _ in sets
                        ]
                attack = attack.with_start_noise(torch.cat(noise))
            return attack_stacked(
                attack, learner.functional, params, batched, [(x, y) for x, y, _ in sets]
            )
        per_task: list[list[Tensor]] = [[] for _ in sets]
        for t in range(tasks):
            at = {n: p[t] for n, p in params.items()} if batched else params
            with self.streams.task(self.offset + t):
                for slot, (inputs, labels, query) in enumerate(sets):
                    perturb = learner.perturb_query if query else learner.perturb
                    per_task[slot].append(perturb(at, inputs[t], labels[t]))
        return [torch.stack(samples) for samples in per_task]

    def append_rows(
        self, inputs: Tensor, labels: Tensor, adversarial: Tensor, fraction: float
    ) -> tuple[Tensor, Tensor]:
        extra_labels = labels
        if fraction < 1:  # one host read: how many rows each task keeps
            chosen = per_class_prefix(labels, fraction)
            counts = chosen.sum(dim=1).tolist()
            if len(set(counts)) != 1:
                raise ValueError(
                    f"engine='vmap': adversarial_fraction={fraction} selects {counts} rows in "
                    "the tasks of this meta-batch; vmap needs equal counts (balanced classes). "
                    "Use engine='sequential'."
                )
            rows = torch.argsort((~chosen).to(torch.uint8), dim=1, stable=True)[:, : counts[0]]
            tasks = torch.arange(labels.shape[0], device=labels.device)[:, None]
            adversarial, extra_labels = adversarial[tasks, rows], labels.gather(1, rows)
        return torch.cat([inputs, adversarial], dim=1), torch.cat([labels, extra_labels], dim=1)


def _joined(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    """``torch.cat(tensors, dim)``, without the copy that a cat of one tensor makes."""
    return tensors[0] if len(tensors) == 1 else torch.cat(list(tensors), dim)


def _groups(shapes: Sequence[Any]) -> list[list[int]]:
    """Indices of equal shapes, in order of first appearance."""
    groups: dict[Any, list[int]] = {}
    for index, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(index)
    return list(groups.values())


def attack_stacked(
    attack: Attack,
    functional: FunctionalModel,
    params: Params,
    batched: bool,
    sets: Sequence[tuple[Tensor, Tensor]],
) -> list[Tensor]:
    """One ``attack`` call for some sets of every task of a stack: ``sets[j] = (inputs
    [T, N_j, ...], labels [T, N_j])``; returns the adversarial inputs in the same layout.

    The attack sees one flat batch, task by task and, within a task, set by set. The model
    it attacks (``functional`` at ``params``; at task ``t``'s parameters ``params[n][t]``
    when ``batched``) evaluates every (task, set) segment on its own; its loss is the sum of
    the segments' losses, so each segment gets the gradient a call of its own would give it.
    A random start is drawn once for the flat batch: give each task its own with
    :meth:`~l2l_adversarial.attacks.Attack.with_start_noise`.
    """
    tasks, sizes = sets[0][0].shape[0], [inputs.shape[1] for inputs, _ in sets]
    detached = {name: p.detach() for name, p in params.items()}
    forward = stacked.forward(functional, detached, batched, tasks)

    def segments(flat: Tensor) -> tuple[Tensor, ...]:
        return flat.unflatten(0, (tasks, -1)).split(sizes, dim=1)

    def model(flat: Tensor) -> Tensor:
        return _joined([forward(s) for s in segments(flat)], dim=1).flatten(0, 1)

    attack = copy.copy(attack)
    attack.loss_fn = _summed_segment_losses(attack.loss_fn, tasks, sizes, segments)
    inputs = _joined([inputs for inputs, _ in sets], dim=1).flatten(0, 1)
    labels = _joined([labels for _, labels in sets], dim=1).flatten(0, 1)
    return list(segments(attack(model, inputs, labels)))


def _summed_segment_losses(
    loss_fn: Callable[..., Tensor],
    tasks: int,
    sizes: Sequence[int],
    segments: Callable[[Tensor], tuple[Tensor, ...]],
) -> Callable[[Tensor, Tensor], Tensor]:
    """The loss :func:`attack_stacked` gives its attack: on the flat batch of ``tasks`` x
    ``sizes`` rows, the sum over its (task, set) segments of ``loss_fn`` on each segment.

    For cross-entropy and NLL, one call on all rows, each weighted by 1 / its set's size (the
    same value, in fewer operations); for other losses, ``loss_fn`` vmapped per set.
    """
    if loss_fn in ROW_MEAN_LOSSES:

        def row_losses(logits: Tensor, labels: Tensor) -> Tensor:
            weights = logits.new_full((tasks, sum(sizes)), 1 / sizes[0])
            for start, n in zip(itertools.accumulate(sizes), sizes[1:], strict=False):
                weights[:, start : start + n] = 1 / n
            return (loss_fn(logits, labels, reduction="none") * weights.flatten()).sum()

        return row_losses
    task_losses = vmap(loss_fn)

    def segment_losses(logits: Tensor, labels: Tensor) -> Tensor:
        pairs = zip(segments(logits), segments(labels), strict=True)
        return torch.stack([task_losses(lg, lb).sum() for lg, lb in pairs]).sum()

    return segment_losses


# -- helpers -------------------------------------------------------------------------------
def _check_stackable(tasks: Sequence[Task]) -> None:
    """vmap stacks the tasks: their shapes must be equal."""
    shapes = [tuple(tuple(t.shape) for t in task) for task in tasks]
    for index, task_shapes in enumerate(shapes):
        if task_shapes != shapes[0]:
            raise ValueError(
                f"engine='vmap' cannot run this meta-batch: task {index} has tensor shapes "
                f"{task_shapes} but task 0 has {shapes[0]}; vmap stacks the tasks, so their "
                "shapes must be equal. Use engine='sequential' (or 'auto')."
            )
