"""R-MAML (Wang et al., ICLR 2021, "On Fast Adversarial Robustness Adaptation in
Model-Agnostic Meta-Learning").

Robustness is regularised in the meta-update only: the inner loop adapts on the clean support
set, ``theta' = theta - alpha grad L(theta, D)``, and theta descends

``L(theta', D') + lambda * R(theta', D', D'_adv)``

with ``D'_adv`` the query set attacked against theta' (``attack_target="adapted"``, default)
and ``R`` the robustness term: the cross-entropy on ``D'_adv`` (``robust_loss="ce"``,
their R-MAML with adversarial cross-entropy) or TRADES's ``KL(f(D') || f(D'_adv))`` at theta'
(``robust_loss="trades"``, their R-MAML-TRADES), ``D'_adv`` then maximising that KL.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor

from l2l_adversarial.algorithms.base import AdversarialMetaLearner
from l2l_adversarial.algorithms.robust import check_weight
from l2l_adversarial.algorithms.task_ops import TaskOps
from l2l_adversarial.task import Task

DEFAULT_ROBUST_WEIGHT = 0.2
"""lambda with ``robust_loss="ce"``: MetaAdv's ``metafgsm.py`` steps the adversarial query loss
with its own Adam at learning rate 0.0002 beside the clean loss's 0.001, a ratio of 0.2."""


class RMAMLObjective(NamedTuple):
    """R-MAML's meta-objective for one task (or its mean over tasks) and its parts."""

    loss: Tensor  # L(theta', D') + lambda * R
    accuracy: Tensor  # accuracy of theta' on D'
    clean_loss: Tensor  # L(theta', D')
    robust_loss: Tensor  # R, unweighted
    adversarial_accuracy: Tensor  # accuracy of theta' on D'_adv

    @property
    def total(self) -> Tensor:
        """``L(theta', D') + lambda * R``: the meta-objective."""
        return self.loss


class RMAML(AdversarialMetaLearner):
    """R-MAML: a drop-in for ``learn2learn.algorithms.MAML`` with a robustness-regularised
    meta-update and a clean inner loop.

    Args:
        model, lr, first_order, allow_unused, allow_nograd: as for :class:`ADML`.
        robust_weight: lambda, the weight of the robustness term; default
            :data:`DEFAULT_ROBUST_WEIGHT` (0.2) with ``robust_loss="ce"`` and ``trades_beta``
            (default 6.0) with ``robust_loss="trades"``.
        **options: :class:`~l2l_adversarial.algorithms.base.AdversarialOptions`; Wang et al.
            train with FGSM from a random start of step 1.25 eps (``attack=FFGSM(eps)``) or
            PGD. ``robust_loss="trades"`` makes R the KL term (the attack then maximises it).
            The placement: ``attack_sets`` ``"query"`` (default: the meta-update only) or
            ``"both"`` (the inner loop adapts on the adversarial support set, attacked
            against theta: MetaAdv's ``metafgsminout.py``), ``attack_target`` ``"adapted"``
            (default: ``D'_adv`` against theta') or ``"initial"`` (against theta).

    Example:
        >>> import torch, l2l_adversarial as l2la
        >>> rmaml = l2la.RMAML(torch.nn.Linear(8, 3), lr=0.01, attack=l2la.FFGSM(eps=2 / 255))
        >>> xs, ys = torch.rand(3, 8), torch.arange(3)
        >>> rmaml.meta_loss(xs, ys, torch.rand(6, 8), torch.arange(3).repeat(2)).backward()
    """

    published_placement = ("query", "adapted")
    placement_sets = ("query", "both")

    def configure(
        self,
        *,
        robust_weight: float | None = None,
        **options: Any,
    ) -> None:
        super().configure(**options)
        if robust_weight is None:
            trades = self.robust.kind == "trades"
            robust_weight = self.robust.beta if trades else DEFAULT_ROBUST_WEIGHT
        self.robust_weight = check_weight("robust_weight", robust_weight)

    def task_objective(
        self, task: Task, steps: int | None = None, ops: TaskOps | None = None
    ) -> RMAMLObjective:
        """``L(theta', D') + lambda * R`` for one task, differentiable in theta."""
        task, steps, ops = self._prepare(task, steps, ops)
        adapted, query_adversarial = self.adapt_then_attack_query(task, steps, ops)
        (pair,) = ops.score_pairs(
            [(adapted, task.query_inputs, query_adversarial, task.query_labels)]
        )
        robust = self.robust.term(pair)
        return RMAMLObjective(
            pair.clean.loss + self.robust_weight * robust,
            pair.clean.accuracy,
            pair.clean.loss,
            robust,
            pair.adversarial.accuracy,
        )
