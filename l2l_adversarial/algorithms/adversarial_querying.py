"""Adversarial Querying (Goldblum, Fowl & Goldstein, NeurIPS 2020).

The inner loop adapts on the clean support set; the meta-objective scores the adapted model
on adversarial queries: ``L(theta', D'_adv)`` with ``theta' = theta - alpha grad L(theta, D_c)``.
By default the queries are attacked against the adapted parameters theta', as in that paper
(``attack_target="adapted"``); ``"initial"`` attacks theta instead, as ADML does.
"""

from __future__ import annotations

from l2l_adversarial.algorithms.base import AdversarialMetaLearner
from l2l_adversarial.algorithms.task_ops import TaskObjective, TaskOps
from l2l_adversarial.task import Task


class AdversarialQuerying(AdversarialMetaLearner):
    """Meta-learning with adversarial queries: a drop-in for ``learn2learn.algorithms.MAML``.

    Args:
        model, lr, first_order, allow_unused, allow_nograd: as for :class:`ADML`.
        **options: :class:`~l2l_adversarial.algorithms.base.AdversarialOptions` (Goldblum et
            al. used PGD-7 of step 2/255 at 8/255; pass ``attack=PGD(...)`` to match them);
            the placement: ``attack_sets`` ``"query"`` (default) or ``"both"`` (the inner
            loop then adapts on the adversarial support set, attacked against theta),
            ``attack_target`` ``"adapted"`` (default) or ``"initial"``;
            ``robust_loss="trades"`` replaces ``L(theta', D'_adv)`` with
            ``L(theta', D') + beta * KL(theta'; D' || D'_adv)``, as their TRADES variant.

    Example:
        >>> import torch, l2l_adversarial as l2la
        >>> aq = l2la.AdversarialQuerying(torch.nn.Linear(8, 3), lr=0.01)
        >>> xs, ys = torch.rand(3, 8), torch.arange(3)
        >>> aq.meta_loss(xs, ys, torch.rand(6, 8), torch.arange(3).repeat(2)).backward()
    """

    published_placement = ("query", "adapted")
    placement_sets = ("query", "both")

    def task_objective(
        self, task: Task, steps: int | None = None, ops: TaskOps | None = None
    ) -> TaskObjective:
        """``L(theta', D'_adv)`` for one task, theta' adapted on the clean support set."""
        task, steps, ops = self._prepare(task, steps, ops)
        adapted, query_adversarial = self.adapt_then_attack_query(task, steps, ops)
        (objective,) = self.robust.score(
            ops, [(adapted, task.query_inputs, query_adversarial, task.query_labels)]
        )
        return objective
