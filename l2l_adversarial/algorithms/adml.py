"""ADML, the ADversarial Meta-Learner (Yin et al., Algorithm 1).

Per task, with meta-parameters theta:

* lines 5-6: clean support ``D_c`` and its adversarial copy ``D_adv`` (attack against theta);
* line 7:    ``theta'_adv = theta - alpha1 grad L(theta, D_adv)``,
             ``theta'_c   = theta - alpha2 grad L(theta, D_c)`` (``adaptation_steps`` steps each);
* lines 8-9: clean query ``D'_c`` and its adversarial copy ``D'_adv`` (attack against theta);
* line 11:   minimise ``L(theta'_adv, D'_c)`` (step beta1) and ``L(theta'_c, D'_adv)`` (step beta2).

Adversarial samples are data: the meta-gradient treats them as constants, as Eq. (1) does.
The task runtime (:func:`l2l_adversarial.engines.meta_step`) runs a meta-batch of these
objectives, task by task or batched.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from torch import Tensor

from l2l_adversarial.algorithms.base import (
    AdversarialMetaLearner,
    check_step_size,
)
from l2l_adversarial.algorithms.task_ops import TaskOps
from l2l_adversarial.task import Task


class ADMLObjective(NamedTuple):
    """The two terms of Eq. (1) for one task (or their mean over tasks), with accuracies."""

    adversarial_support_loss: Tensor  # L(theta'_adv, D'_c)
    clean_support_loss: Tensor  # L(theta'_c, D'_adv)
    adversarial_support_accuracy: Tensor  # accuracy of theta'_adv on D'_c
    clean_support_accuracy: Tensor  # accuracy of theta'_c on D'_adv

    @property
    def total(self) -> Tensor:
        """``L(theta'_adv, D'_c) + L(theta'_c, D'_adv)``: the joint meta-objective."""
        return self.adversarial_support_loss + self.clean_support_loss

    @property
    def accuracy(self) -> Tensor:
        """Mean query accuracy of the two adapted models."""
        return (self.adversarial_support_accuracy + self.clean_support_accuracy) / 2


class ADML(AdversarialMetaLearner):
    """ADversarial Meta-Learner: a drop-in replacement for ``learn2learn.algorithms.MAML``.

    Args:
        model: any ``nn.Module`` with trainable parameters.
        lr: alpha1, the inner step size on adversarial support samples (paper: 0.01).
        first_order: drop second-order terms of the meta-gradient.
        allow_unused, allow_nograd: learn2learn's switches for unused and frozen
            (``requires_grad=False``) parameters, on every path
            (:class:`~l2l_adversarial.algorithms.base.MetaLearner`).
        clean_lr: alpha2, the inner step size on clean support samples; defaults to ``lr``.
        **options: :class:`~l2l_adversarial.algorithms.base.AdversarialOptions`: ``attack``
            (makes ``D_adv`` and ``D'_adv``; default ``FGSM(eps=2/255)``),
            ``adaptation_steps`` (inner steps per branch; the paper: 5 in meta-training),
            ``loss_fn``, ``channels_last``; the placement: ``attack_sets`` (``"both"``,
            Algorithm 1; with ``"query"``, ``D_adv = D_c``; with ``"support"``,
            ``D'_adv = D'_c``) and ``attack_target`` (``"initial"``, Algorithm 1: all
            adversarial samples against theta; ``"adapted"``: ``D'_adv`` against theta'_c,
            the model scored on it); ``robust_loss="trades"`` replaces
            ``L(theta'_c, D'_adv)`` with ``L(theta'_c, D'_c) + beta * KL(theta'_c; D'_c ||
            D'_adv)`` (``D'_adv`` then maximising the KL; the inner loop on ``D_adv`` keeps
            the cross-entropy).

    Example:
        >>> import torch, l2l_adversarial as l2la
        >>> adml = l2la.ADML(torch.nn.Linear(8, 3), lr=0.01, adaptation_steps=5)
        >>> opt = torch.optim.Adam(adml.parameters(), lr=0.001)
        >>> xs, ys = torch.rand(3, 8), torch.arange(3)
        >>> xq, yq = torch.rand(6, 8), torch.arange(3).repeat(2)
        >>> loss = adml.meta_loss(xs, ys, xq, yq)   # Eq. (1) for this task
        >>> loss.backward(); opt.step()
    """

    two_step_update = (  # line 11 with two optimizers: beta1, then beta2
        ("adversarial_support_loss", "adversarial_support_accuracy"),
        ("clean_support_loss", "clean_support_accuracy"),
    )

    def configure(
        self,
        *,
        clean_lr: float | None = None,
        **options: Any,
    ) -> None:
        super().configure(**options)
        self.clean_lr = self.lr if clean_lr is None else check_step_size("clean_lr", clean_lr)

    def task_objective(
        self, task: Task, steps: int | None = None, ops: TaskOps | None = None
    ) -> ADMLObjective:
        """Lines 5-11 of Algorithm 1 for one task, differentiable in theta.

        Example:
            >>> import torch, l2l_adversarial as l2la
            >>> adml = l2la.ADML(torch.nn.Linear(8, 3), lr=0.01)
            >>> task = l2la.Task(torch.rand(3, 8), torch.arange(3), torch.rand(6, 8),
            ...                  torch.arange(3).repeat(2))
            >>> adml.task_objective(task).total.backward()
        """
        task, steps, ops = self._prepare(task, steps, ops)
        support, labels = task.support_inputs, task.support_labels
        query, query_labels = task.query_inputs, task.query_labels
        query_first = self.attacks_query and self.attack_target == "initial"
        # lines 5-6 and 8-9: D_adv and D'_adv against theta (D'_adv after line 7 if "adapted")
        before = [(query, query_labels, True)] if query_first else []
        before += [(support, labels, False)] if self.attacks_support else []
        made = ops.perturb(before)
        query_adversarial = made.pop(0) if query_first else query
        support_adversarial = made.pop(0) if self.attacks_support else support
        # line 7: theta'_adv from D_adv (step alpha1), theta'_c from D_c (step alpha2)
        theta_adv, theta_c = ops.adapt(
            [(support_adversarial, labels, self.lr), (support, labels, self.clean_lr)], steps
        )
        if self.attacks_query and not query_first:
            (query_adversarial,) = ops.perturb([(query, query_labels, True)], against=theta_c)
        # line 11: L(theta'_adv, D'_c) + L(theta'_c, D'_adv)
        adversarial_branch, clean_branch = self.robust.score(
            ops,
            [(theta_c, query, query_adversarial, query_labels)],
            others=[(theta_adv, query, query_labels)],
        )
        return ADMLObjective(
            adversarial_branch.loss,
            clean_branch.loss,
            adversarial_branch.accuracy,
            clean_branch.accuracy,
        )
