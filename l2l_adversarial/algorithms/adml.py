"""ADML, the ADversarial Meta-Learner (Yin et al., Algorithm 1).

Per task, with meta-parameters theta:

* lines 5-6: clean support ``D_c`` and its adversarial copy ``D_adv`` (attack against theta);
* line 7:    ``theta'_adv = theta - alpha1 grad L(theta, D_adv)``,
             ``theta'_c   = theta - alpha2 grad L(theta, D_c)`` (``adaptation_steps`` steps each);
* lines 8-9: clean query ``D'_c`` and its adversarial copy ``D'_adv`` (attack against theta);
* line 11:   minimise ``L(theta'_adv, D'_c)`` (step beta1) and ``L(theta'_c, D'_adv)`` (step beta2).

Adversarial samples are data: the meta-gradient treats them as constants, as Eq. (1) does.

FGSM on ``D_c`` (line 6) and the first clean step of line 7 both need the gradient of
``L(theta, D_c)``, one with respect to the support inputs, the other with respect to theta.
With FGSM, one backward pass gives both (:attr:`ADML.shares_support_pass`); the results are
identical to two passes. :func:`l2l_adversarial.engines.meta_step` runs a meta-batch, task by
task or with all tasks and both branches batched by ``torch.func.vmap``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from typing_extensions import Unpack

from l2l_adversarial.algorithms.base import (
    ATTACK_TARGETS,
    AdversarialMetaLearner,
    AdversarialOptions,
    check_step_size,
)
from l2l_adversarial.algorithms.task_ops import TaskOps
from l2l_adversarial.attacks import FGSM
from l2l_adversarial.functional import Params
from l2l_adversarial.task import Task
from l2l_adversarial.validation import check_choice


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
        clean_lr: alpha2, the inner step size on clean support samples; defaults to ``lr``.
        attack_target: ``"initial"`` (Algorithm 1: all adversarial samples against theta) or
            ``"adapted"`` (``D'_adv`` against theta'_c, the model that is scored on it).
        **options: :class:`~l2l_adversarial.algorithms.base.AdversarialOptions`: ``attack``
            (makes ``D_adv`` and ``D'_adv``; default ``FGSM(eps=2/255)``),
            ``adaptation_steps`` (inner steps per branch; the paper: 5 in meta-training),
            ``loss_fn``, ``channels_last``.

    Example:
        >>> import torch, l2l_adversarial as l2la
        >>> adml = l2la.ADML(torch.nn.Linear(8, 3), lr=0.01, adaptation_steps=5)
        >>> opt = torch.optim.Adam(adml.parameters(), lr=0.001)
        >>> xs, ys = torch.rand(3, 8), torch.arange(3)
        >>> xq, yq = torch.rand(6, 8), torch.arange(3).repeat(2)
        >>> loss = adml.meta_loss(xs, ys, xq, yq)   # Eq. (1) for this task
        >>> loss.backward(); opt.step()
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        first_order: bool = False,
        *,
        clean_lr: float | None = None,
        attack_target: str = "initial",
        **options: Unpack[AdversarialOptions],
    ) -> None:
        super().__init__(model, lr, first_order, **options)
        self.clean_lr = self.lr if clean_lr is None else check_step_size("clean_lr", clean_lr)
        check_choice("attack_target", attack_target, ATTACK_TARGETS)
        self.attack_target = attack_target

    @property
    def shares_support_pass(self) -> bool:
        """Whether FGSM on ``D_c`` and line 7's first clean step come from one backward pass.

        Both are gradients of ``L(theta, D_c)``; one pass gives results identical to two.
        True for :class:`~l2l_adversarial.attacks.FGSM` with ``eps > 0``, no ``mean``/``std``
        and this learner's loss, on a model without active dropout (two passes would draw two
        masks). Other attacks take the generic path: attack, then adapt.
        """
        attack = self.attack
        return (
            type(attack) is FGSM
            and attack.eps > 0
            and attack.mean is None
            and attack.loss_fn is self.functional.loss_fn
            and not any(
                isinstance(layer, nn.modules.dropout._DropoutNd) and layer.training
                for layer in self.functional.module.modules()
            )
        )

    def task_objective(
        self, task: Task, steps: int | None = None, ops: TaskOps | None = None
    ) -> ADMLObjective:
        """Lines 5-11 of Algorithm 1 for one task, differentiable in theta.

        Lines 5-6 and 8-9: ``D_adv`` and ``D'_adv`` against theta (with
        ``attack_target="adapted"``, ``D'_adv`` against theta'_c); line 7: both inner loops;
        line 11: ``L(theta'_adv, D'_c)`` and ``L(theta'_c, D'_adv)``. On one task with FGSM
        (:attr:`shares_support_pass`) line 6 and the first clean step of line 7 come from one
        backward pass; the result is identical.

        Example:
            >>> import torch, l2l_adversarial as l2la
            >>> adml = l2la.ADML(torch.nn.Linear(8, 3), lr=0.01)
            >>> task = l2la.Task(torch.rand(3, 8), torch.arange(3), torch.rand(6, 8),
            ...                  torch.arange(3).repeat(2))
            >>> adml.task_objective(task).total.backward()
        """
        task, steps, ops = self._prepare(task, steps, ops)
        theta = ops.theta
        support, labels = task.support_inputs, task.support_labels
        query = (task.query_inputs, task.query_labels, True)
        initial = self.attack_target == "initial"
        if not ops.batched and not ops.replaying and self.shares_support_pass:
            (query_adversarial,) = ops.perturb(theta, [query]) if initial else (None,)
            support_adversarial, clean_step = self._fgsm_and_clean_step(theta, support, labels)
            ops.record(support_adversarial)
            (theta_adv,) = ops.adapt(theta, [(support_adversarial, labels, self.lr)], steps)
            (theta_c,) = ops.adapt(clean_step, [(support, labels, self.clean_lr)], steps - 1)
        else:
            if initial:
                query_adversarial, support_adversarial = ops.perturb(
                    theta, [query, (support, labels, False)]
                )
            else:
                query_adversarial, (support_adversarial,) = (
                    None,
                    ops.perturb(theta, [(support, labels, False)]),
                )
            theta_adv, theta_c = ops.adapt(
                theta,
                [(support_adversarial, labels, self.lr), (support, labels, self.clean_lr)],
                steps,
            )
        if query_adversarial is None:
            (query_adversarial,) = ops.perturb(theta_c, [query])
        adversarial_branch, clean_branch = ops.score(
            [
                (theta_adv, task.query_inputs, task.query_labels),
                (theta_c, query_adversarial, task.query_labels),
            ]
        )
        return ADMLObjective(
            adversarial_branch.loss,
            clean_branch.loss,
            adversarial_branch.accuracy,
            clean_branch.accuracy,
        )

    def _fgsm_and_clean_step(
        self, theta: Params, inputs: Tensor, labels: Tensor
    ) -> tuple[Tensor, Params]:
        """FGSM on ``D_c`` against theta (line 6) and ``theta - alpha2 grad L(theta, D_c)``
        (line 7's first clean step), both from one backward pass of ``L(theta, D_c)``.

        The clean step's graph then also depends on the support inputs, so the meta-gradient's
        backward pass runs through them too: that gives back part of the pass saved."""
        attack = self.attack
        attack.check_range(inputs)  # the check the attack makes itself
        with torch.enable_grad():
            pixels = inputs.detach().requires_grad_(True)
            loss = self.functional.loss_fn(self.functional(theta, pixels), labels)
            *gradients, input_gradient = torch.autograd.grad(
                loss,
                [*theta.values(), pixels],
                create_graph=not self.first_order,
                allow_unused=True,
            )
        # FGSM.perturb_pixels with the gradient already at hand
        adversarial = (pixels.detach() + attack.eps * input_gradient.detach().sign()).clamp(
            *attack.data_range
        )
        clean_first_step = {
            name: p if g is None else p - self.clean_lr * g
            for (name, p), g in zip(theta.items(), gradients, strict=True)
        }
        return adversarial, clean_first_step
