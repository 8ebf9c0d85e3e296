"""MAML-AD, the paper's straw-man baseline (Eq. 2-3): plain MAML on mixed clean/adversarial sets.

Both the support set ``D_i`` and the query set ``D'_i`` are the clean samples plus
adversarial copies of a fraction of them; then ``theta'_i = theta - alpha grad L(theta, D_i)``
and theta descends ``L(theta'_i, D'_i)``. With ``adversarial_fraction=1`` (default) every clean
sample is joined by its adversarial copy: the same K + K samples ADML's inner loop sees.
"""

from __future__ import annotations

from typing import Any

from l2l_adversarial.algorithms.base import AdversarialMetaLearner
from l2l_adversarial.algorithms.task_ops import TaskObjective, TaskOps
from l2l_adversarial.task import Task


class MAMLAD(AdversarialMetaLearner):
    """MAML with adversarial training mixed into both the inner loop and the meta-update.

    Args:
        model, lr, first_order, allow_unused, allow_nograd: as for :class:`ADML`.
        adversarial_fraction: fraction of each class's clean samples whose adversarial copy
            is added to the set, in ``[0, 1]``; default 1. A fraction strictly between 0 and 1
            selects rows by label: one host read per set.
        **options: :class:`~l2l_adversarial.algorithms.base.AdversarialOptions`.

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
        if fraction > 0:
            support_adversarial, query_adversarial = ops.perturb(
                [(*support, False), (*query, True)]
            )
            support = ops.append_rows(*support, support_adversarial, fraction)
            query = ops.append_rows(*query, query_adversarial, fraction)
        (adapted,) = ops.adapt([(*support, self.lr)], steps)
        (objective,) = ops.score([(adapted, *query)])
        return objective
