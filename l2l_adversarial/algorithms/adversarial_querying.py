"""Adversarial Querying (Goldblum, Fowl & Goldstein, NeurIPS 2020).

The inner loop adapts on the clean support set; the meta-objective scores the adapted model
on adversarial queries: ``L(theta', D'_adv)`` with ``theta' = theta - alpha grad L(theta, D_c)``.
By default the queries are attacked against the adapted parameters theta', as in that paper
(``attack_target="adapted"``); ``"initial"`` attacks theta instead, as ADML does.
"""

from __future__ import annotations

from torch import Tensor, nn

from l2l_adversarial.algorithms.base import ATTACK_TARGETS, AdversarialMetaLearner
from l2l_adversarial.attacks import Attack
from l2l_adversarial.functional import LossFn
from l2l_adversarial.validation import check_choice, check_task


class AdversarialQuerying(AdversarialMetaLearner):
    """Meta-learning with adversarial queries: a drop-in for ``learn2learn.algorithms.MAML``.

    Args:
        model, lr, first_order, attack, adaptation_steps, loss_fn, channels_last: as for
            :class:`ADML`
            (Goldblum et al. used PGD; pass ``attack=PGD(...)`` to match them).
        attack_target: ``"adapted"`` (default) or ``"initial"``.

    Example:
        >>> import torch, l2l_adversarial as l2la
        >>> aq = l2la.AdversarialQuerying(torch.nn.Linear(8, 3), lr=0.01)
        >>> xs, ys = torch.rand(3, 8), torch.arange(3)
        >>> aq.meta_loss(xs, ys, torch.rand(6, 8), torch.arange(3).repeat(2)).backward()
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        first_order: bool = False,
        *,
        attack: Attack | None = None,
        adaptation_steps: int = 1,
        attack_target: str = "adapted",
        loss_fn: LossFn | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__(
            model,
            lr,
            first_order,
            attack=attack,
            adaptation_steps=adaptation_steps,
            loss_fn=loss_fn,
            allow_unused=allow_unused,
            allow_nograd=allow_nograd,
            channels_last=channels_last,
        )
        check_choice("attack_target", attack_target, ATTACK_TARGETS)
        self.attack_target = attack_target

    def loss_and_accuracy(
        self,
        support_inputs: Tensor,
        support_labels: Tensor,
        query_inputs: Tensor,
        query_labels: Tensor,
        steps: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``L(theta', D'_adv)`` for one task, theta' adapted on the clean support set."""
        check_task(support_inputs, support_labels, query_inputs, query_labels)
        theta = self.meta_parameters()
        adapted = self.adapt_functional(
            theta, support_inputs, support_labels, self.lr, self.resolve_steps(steps)
        )
        attacked = adapted if self.attack_target == "adapted" else theta
        query_adversarial = self.perturb_query(attacked, query_inputs, query_labels)
        return self.functional.query_loss(adapted, query_adversarial, query_labels)
