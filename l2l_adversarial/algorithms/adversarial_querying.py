"""Adversarial Querying (Goldblum, Fowl & Goldstein, NeurIPS 2020).

The inner loop adapts on the clean support set; the meta-objective scores the adapted model
on adversarial queries: ``L(theta', D'_adv)`` with ``theta' = theta - alpha grad L(theta, D_c)``.
By default the queries are attacked against the adapted parameters theta', as in that paper
(``attack_target="adapted"``); ``"initial"`` attacks theta instead, as ADML does.
"""

from __future__ import annotations

from typing import Any

from l2l_adversarial.algorithms.base import (
    ATTACK_TARGETS,
    AdversarialMetaLearner,
)
from l2l_adversarial.algorithms.task_ops import TaskObjective, TaskOps
from l2l_adversarial.task import Task
from l2l_adversarial.validation import check_choice


class AdversarialQuerying(AdversarialMetaLearner):
    """Meta-learning with adversarial queries: a drop-in for ``learn2learn.algorithms.MAML``.

    Args:
        model, lr, first_order, allow_unused, allow_nograd: as for :class:`ADML`.
        attack_target: ``"adapted"`` (default) or ``"initial"``.
        **options: :class:`~l2l_adversarial.algorithms.base.AdversarialOptions` (Goldblum et
            al. used PGD; pass ``attack=PGD(...)`` to match them).

    Example:
        >>> import torch, l2l_adversarial as l2la
        >>> aq = l2la.AdversarialQuerying(torch.nn.Linear(8, 3), lr=0.01)
        >>> xs, ys = torch.rand(3, 8), torch.arange(3)
        >>> aq.meta_loss(xs, ys, torch.rand(6, 8), torch.arange(3).repeat(2)).backward()
    """

    def configure(
        self,
        *,
        attack_target: str = "adapted",
        **options: Any,
    ) -> None:
        super().configure(**options)
        check_choice("attack_target", attack_target, ATTACK_TARGETS)
        self.attack_target = attack_target

    def task_objective(
        self, task: Task, steps: int | None = None, ops: TaskOps | None = None
    ) -> TaskObjective:
        """``L(theta', D'_adv)`` for one task, theta' adapted on the clean support set."""
        task, steps, ops = self._prepare(task, steps, ops)
        (adapted,) = ops.adapt([(task.support_inputs, task.support_labels, self.lr)], steps)
        attacked = adapted if self.attack_target == "adapted" else None  # None: theta
        (query_adversarial,) = ops.perturb(
            [(task.query_inputs, task.query_labels, True)], against=attacked
        )
        (objective,) = ops.score([(adapted, query_adversarial, task.query_labels)])
        return objective
