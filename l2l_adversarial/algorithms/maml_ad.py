"""MAML-AD, the paper's straw-man baseline (Eq. 2-3): plain MAML on mixed clean/adversarial sets.

Both the support set ``D_i`` and the query set ``D'_i`` are the clean samples plus
adversarial copies of a fraction of them; then ``theta'_i = theta - alpha grad L(theta, D_i)``
and theta descends ``L(theta'_i, D'_i)``. With ``adversarial_fraction=1`` (default) every clean
sample is joined by its adversarial copy: the same K + K samples ADML's inner loop sees.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from l2l_adversarial.algorithms.base import AdversarialMetaLearner
from l2l_adversarial.algorithms.task_ops import TaskObjective, TaskOps
from l2l_adversarial.task import Task, per_class_prefix


class MAMLAD(AdversarialMetaLearner):
    """MAML with adversarial training mixed into both the inner loop and the meta-update.

    Args:
        model, lr, first_order, allow_unused, allow_nograd: as for :class:`ADML`.
        adversarial_fraction: fraction of each class's clean samples whose adversarial copy
            is added to the set, in ``[0, 1]``; default 1. A fraction strictly between 0 and 1
            selects rows by label: one host read per set.
        **options: :class:`~l2l_adversarial.algorithms.base.AdversarialOptions`; the
            placement: ``attack_sets`` (``"both"``, Eq. 2-3; ``"support"`` or ``"query"``
            leaves the other set clean) and ``attack_target`` (``"initial"``: every set
            against theta; ``"adapted"``: the query set against theta'_i);
            ``robust_loss="trades"`` scores the query set with ``L(theta'_i, D') + beta *
            KL(theta'_i; D' || D'_adv)``, ``D'_adv`` being ``D'`` with the chosen rows
            replaced by their adversarial copies (the support set keeps its appended rows).

    Example:
        >>> import torch, l2l_adversarial as l2la
        >>> mamlad = l2la.MAMLAD(torch.nn.Linear(8, 3), lr=0.01)
        >>> xs, ys = torch.rand(3, 8), torch.arange(3)
        >>> mamlad.meta_loss(xs, ys, torch.rand(6, 8), torch.arange(3).repeat(2)).backward()
    """

    def configure(
        self,
        *,
        adversarial_fraction: float = 1.0,
        **options: Any,
    ) -> None:
        super().configure(**options)
        if isinstance(adversarial_fraction, bool) or not (
            isinstance(adversarial_fraction, (int, float)) and 0.0 <= adversarial_fraction <= 1.0
        ):
            raise ValueError(
                f"adversarial_fraction must be a number in [0, 1], got {adversarial_fraction!r}"
            )
        self.adversarial_fraction = float(adversarial_fraction)

    def task_objective(
        self, task: Task, steps: int | None = None, ops: TaskOps | None = None
    ) -> TaskObjective:
        """Eq. (3)'s term for one task: ``L(theta'_i, D'_i)`` with ``theta'_i`` from Eq. (2).

        The whole set is attacked and the chosen rows kept: a sample's adversarial copy is
        then the same whatever the fraction (and equals the evaluation transform's).
        """
        task, steps, ops = self._prepare(task, steps, ops)
        fraction = self.adversarial_fraction
        support = task.support_inputs, task.support_labels
        query = task.query_inputs, task.query_labels
        attack_support = fraction > 0 and self.attacks_support
        attack_query = fraction > 0 and self.attacks_query
        query_first = attack_query and self.attack_target == "initial"
        before = [(*support, False)] if attack_support else []
        made = ops.perturb(before + ([(*query, True)] if query_first else []))
        if attack_support:
            support = ops.append_rows(*support, made.pop(0), fraction)
        (adapted,) = ops.adapt([(*support, self.lr)], steps)
        if not attack_query:
            (objective,) = ops.score([(adapted, *query)])
            return objective
        if not query_first:
            made = ops.perturb([(*query, True)], against=adapted)
        if self.robust.kind == "ce":
            (objective,) = ops.score([(adapted, *ops.append_rows(*query, made[0], fraction))])
            return objective
        replaced = _rows_replaced(*query, made[0], fraction)
        (objective,) = self.robust.score(ops, [(adapted, query[0], replaced, query[1])])
        return objective


def _rows_replaced(inputs: Tensor, labels: Tensor, adversarial: Tensor, fraction: float) -> Tensor:
    """``inputs`` with the rows of ``per_class_prefix(labels, fraction)`` replaced by their
    adversarial copies (no host read: the same on a stack of tasks)."""
    if fraction >= 1:
        return adversarial
    chosen = per_class_prefix(labels, fraction)
    chosen = chosen.view(*chosen.shape, *[1] * (inputs.dim() - chosen.dim()))
    return torch.where(chosen, adversarial, inputs)
