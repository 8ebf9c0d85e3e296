"""A stack of tasks through the per-task operations at once (the task runtime's batched
engine): each inner loop one pass for all tasks (and for sets of equal shapes, such as ADML's
two branches, one pass for all of them), each query loss one pass, each attack one call over
the stack where the attack is :attr:`~l2l_adversarial.attacks.Attack.batchable` (each task's
random start from its own stream), task by task otherwise. :mod:`l2l_adversarial.runtime.layouts`
runs the stack, folded into channels or vmapped.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from l2l_adversarial.algorithms.task_ops import (
    AdaptSet,
    AttackSet,
    OutputSet,
    ScoreSet,
    TaskObjective,
    TaskOps,
)
from l2l_adversarial.attacks import Attack
from l2l_adversarial.functional import FunctionalModel, Params
from l2l_adversarial.runtime import layouts
from l2l_adversarial.runtime.layouts import ROW_MEAN_LOSSES
from l2l_adversarial.task import per_class_prefix

__all__ = ["StackedOps", "attack_stacked"]


class StackedOps(TaskOps):
    """The operations on a stack of tasks (leading dimension ``T``).

    Parameters other than theta (``None``) carry the task dimension; losses and accuracies
    come back as ``[T]`` tensors; task ``t`` of the stack draws its random starts as task
    ``first_task + t``.
    """

    def _stacked(self, params: Params | None) -> tuple[Params, bool]:
        """``(params, per_task)``: theta is shared by the stack, other parameters are not."""
        if params is None:
            return self.learner.meta_parameters(), False
        return params, True

    def adapt(
        self,
        sets: Sequence[AdaptSet],
        steps: int,
        start: Params | None = None,
        trajectory: bool = False,
    ) -> list[Params]:
        params, per_task = self._stacked(start)
        if steps == 0:  # theta as each task's own parameters
            tasks = sets[0][0].shape[0]
            if not per_task:
                params = {n: p.expand(tasks, *p.shape) for n, p in params.items()}
            return [] if trajectory else [params for _ in sets]
        allow_unused = self.inner_loop_rules()
        functional, first_order = self.learner.functional, self.learner.first_order
        if trajectory:
            ((inputs, labels, lr),) = sets
            return layouts.adapt(
                functional, params, per_task, inputs, labels, lr, steps, first_order, True,
                allow_unused=allow_unused,
            )  # fmt: skip
        adapted: list[Params] = [{} for _ in sets]
        for members in _groups([(inputs.shape, labels.shape) for inputs, labels, _ in sets]):
            inputs = _joined([sets[i][0] for i in members])
            labels = _joined([sets[i][1] for i in members])
            tasks = sets[members[0]][0].shape[0]
            joined = params
            if per_task and len(members) > 1:
                joined = {n: torch.cat([p] * len(members)) for n, p in params.items()}
            (result,) = layouts.adapt(
                functional, joined, per_task, inputs, labels,
                _step_sizes([sets[i][2] for i in members], tasks, inputs), steps, first_order,
                allow_unused=allow_unused,
            )  # fmt: skip
            for slot, i in enumerate(members):
                adapted[i] = {n: p[slot * tasks : (slot + 1) * tasks] for n, p in result.items()}
        return adapted

    def score(self, sets: Sequence[ScoreSet]) -> list[TaskObjective]:
        scored: list[TaskObjective] = [TaskObjective(torch.empty(0), torch.empty(0))] * len(sets)
        for members, params, per_task, inputs in self._joined_sets([(p, x) for p, x, _ in sets]):
            labels = _joined([sets[i][2] for i in members])
            losses, accuracies = layouts.losses(
                self.learner.functional, params, per_task, inputs, labels
            )
            for i, part in _parts(members, sets[members[0]][1].shape[0]):
                scored[i] = TaskObjective(losses[part], accuracies[part])
        return scored

    def outputs(self, sets: Sequence[OutputSet]) -> list[Tensor]:
        outputs: list[Tensor] = [torch.empty(0)] * len(sets)
        for members, params, per_task, inputs in self._joined_sets(sets):
            joined = layouts.outputs(self.learner.functional, params, per_task, inputs)
            for i, part in _parts(members, sets[members[0]][1].shape[0]):
                outputs[i] = joined[part]
        return outputs

    def scored(self, outputs: Tensor, labels: Tensor) -> TaskObjective:
        return TaskObjective(*layouts.scored(self.learner.functional, outputs, labels))

    def _joined_sets(
        self, sets: Sequence[OutputSet]
    ) -> Iterator[tuple[list[int], Params, bool, Tensor]]:
        """``(members, params, per_task, inputs)``: sets of equal shapes at per-task
        parameters joined as extra tasks of one stack (theta's sets one by one)."""
        if len(sets) > 1 and all(p is not None for p, _ in sets):
            groups = _groups([x.shape for _, x in sets])
        else:
            groups = [[i] for i in range(len(sets))]
        for members in groups:
            params, per_task = self._stacked(sets[members[0]][0])
            if len(members) > 1:
                joined = [self._stacked(sets[i][0])[0] for i in members]
                params = {n: torch.cat([p[n] for p in joined]) for n in params}
            yield members, params, per_task, _joined([sets[i][1] for i in members])

    def _perturb(
        self,
        sets: Sequence[AttackSet],
        against: Params | None,
        attack: Attack,
        stream: tuple[int, ...],
    ) -> list[Tensor]:
        params, per_task = self._stacked(against)
        tasks = sets[0][0].shape[0]
        if not attack.batchable:
            return self._perturb_each(sets, params, per_task, attack, stream)
        if attack.draws_random:  # each task's start from its own stream, as in sequence
            noise = []
            for t in range(tasks):
                for x, _, _ in sets:
                    with self.starts.generator(self.first_task + t, stream) as generator:
                        noise.append(attack.start_offset(x[t], generator or attack.generator))
            attack = attack.with_start_noise(torch.cat(noise))
        return attack_stacked(
            attack, self.learner.functional, params, per_task, [(x, y) for x, y, _ in sets]
        )

    def _perturb_each(
        self,
        sets: Sequence[AttackSet],
        params: Params,
        per_task: bool,
        attack: Attack,
        stream: tuple[int, ...],
    ) -> list[Tensor]:
        """Attacks that cannot attack a stack in one call, task by task."""
        functional = self.learner.functional
        per_set: list[list[Tensor]] = [[] for _ in sets]
        for t in range(sets[0][0].shape[0]):
            model = functional.at({n: p[t] for n, p in params.items()} if per_task else params)
            for slot, (inputs, labels, _) in enumerate(sets):
                with self.starts.generator(self.first_task + t, stream) as generator:
                    drawing = attack if generator is None else attack.drawing_from(generator)
                    per_set[slot].append(drawing(model, inputs[t], labels[t]))
        return [torch.stack(samples) for samples in per_set]

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


def _parts(members: Sequence[int], tasks: int) -> Iterator[tuple[int, slice]]:
    """Each member set's slice of a stack that joined ``members`` as extra tasks."""
    for slot, i in enumerate(members):
        yield i, slice(slot * tasks, (slot + 1) * tasks)


def _step_sizes(rates: Sequence[float], tasks: int, like: Tensor) -> Tensor | float:
    """One float for sets of one step size, else each (set, task) pair's as a tensor."""
    if len(set(rates)) == 1:
        return rates[0]
    return torch.cat(
        [torch.full((tasks,), rate, dtype=like.dtype, device=like.device) for rate in rates]
    )


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
    forward = layouts.forward(functional, detached, batched, tasks)

    def segments(flat: Tensor) -> tuple[Tensor, ...]:
        return flat.unflatten(0, (tasks, -1)).split(sizes, dim=1)

    def model(flat: Tensor) -> Tensor:
        return _joined([forward(s) for s in segments(flat)], dim=1).flatten(0, 1)

    attack = copy.copy(attack)
    attack.gradient_loss = _summed_segment_losses(attack.gradient_loss, tasks, sizes, segments)
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
