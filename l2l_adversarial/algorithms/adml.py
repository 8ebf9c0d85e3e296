"""ADML, the ADversarial Meta-Learner (Yin et al., Algorithm 1).

Per task, with meta-parameters theta:

* lines 5-6: clean support ``D_c`` and its adversarial copy ``D_adv`` (attack against theta);
* line 7:    ``theta'_adv = theta - alpha1 grad L(theta, D_adv)``,
             ``theta'_c   = theta - alpha2 grad L(theta, D_c)`` (``adaptation_steps`` steps each);
* lines 8-9: clean query ``D'_c`` and its adversarial copy ``D'_adv`` (attack against theta);
* line 11:   minimise ``L(theta'_adv, D'_c)`` (step beta1) and ``L(theta'_c, D'_adv)`` (step beta2).

Adversarial samples are data: the meta-gradient treats them as constants, as Eq. (1) does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from l2l_adversarial.algorithms.base import (
    ATTACK_TARGETS,
    AdversarialMetaLearner,
    check_step_size,
)
from l2l_adversarial.attacks import Attack
from l2l_adversarial.functional import LossFn
from l2l_adversarial.task import Task
from l2l_adversarial.validation import check_choice, check_task


@dataclass(frozen=True)
class AdversarialTask:
    """One task after lines 5-6 and 8-9: clean and adversarial support and query sets.

    ``query_adversarial`` is ``None`` when it is generated against the adapted parameters
    (``attack_target="adapted"``), which exist only inside :meth:`ADML.objective`.
    """

    support_clean: Tensor
    support_adversarial: Tensor
    support_labels: Tensor
    query_clean: Tensor
    query_adversarial: Tensor | None
    query_labels: Tensor


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
        attack: attack that makes ``D_adv`` and ``D'_adv``; default ``FGSM(eps=2/255)``.
        clean_lr: alpha2, the inner step size on clean support samples; defaults to ``lr``.
        adaptation_steps: inner steps per branch (the paper: 5 in meta-training).
        attack_target: ``"initial"`` (Algorithm 1: all adversarial samples against theta) or
            ``"adapted"`` (``D'_adv`` against theta'_c, the model that is scored on it).
        loss_fn: task loss; cross-entropy by default.

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
        attack: Attack | None = None,
        clean_lr: float | None = None,
        adaptation_steps: int = 1,
        attack_target: str = "initial",
        loss_fn: LossFn | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
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
        )
        self.clean_lr = self.lr if clean_lr is None else check_step_size("clean_lr", clean_lr)
        check_choice("attack_target", attack_target, ATTACK_TARGETS)
        self.attack_target = attack_target

    def adversarial_task(
        self,
        support_inputs: Tensor,
        support_labels: Tensor,
        query_inputs: Tensor,
        query_labels: Tensor,
    ) -> AdversarialTask:
        """Lines 5-6 and 8-9: adversarial copies of the support and query sets against theta."""
        check_task(support_inputs, support_labels, query_inputs, query_labels)
        theta = self.meta_parameters()
        query_adversarial = None
        if self.attack_target == "initial":
            query_adversarial = self.perturb(theta, query_inputs, query_labels)
        return AdversarialTask(
            support_clean=support_inputs,
            support_adversarial=self.perturb(theta, support_inputs, support_labels),
            support_labels=support_labels,
            query_clean=query_inputs,
            query_adversarial=query_adversarial,
            query_labels=query_labels,
        )

    def objective(self, task: AdversarialTask, steps: int | None = None) -> ADMLObjective:
        """Line 7 and the two losses of line 11 for one task, differentiable in theta."""
        steps = self.resolve_steps(steps)
        theta = self.meta_parameters()
        theta_adv = self.adapt_functional(
            theta, task.support_adversarial, task.support_labels, self.lr, steps
        )
        theta_c = self.adapt_functional(
            theta, task.support_clean, task.support_labels, self.clean_lr, steps
        )
        query_adversarial = task.query_adversarial
        if query_adversarial is None:
            query_adversarial = self.perturb(theta_c, task.query_clean, task.query_labels)
        loss_adv, acc_adv = self.functional.loss(theta_adv, task.query_clean, task.query_labels)
        loss_c, acc_c = self.functional.loss(theta_c, query_adversarial, task.query_labels)
        return ADMLObjective(loss_adv, loss_c, acc_adv, acc_c)

    def meta_loss(
        self,
        support_inputs: Tensor,
        support_labels: Tensor,
        query_inputs: Tensor,
        query_labels: Tensor,
        steps: int | None = None,
    ) -> Tensor:
        """Eq. (1) for one task: ``L(theta'_adv, D'_c) + L(theta'_c, D'_adv)``."""
        task = self.adversarial_task(support_inputs, support_labels, query_inputs, query_labels)
        return self.objective(task, steps).total

    def loss_and_accuracy(
        self,
        support_inputs: Tensor,
        support_labels: Tensor,
        query_inputs: Tensor,
        query_labels: Tensor,
        steps: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Eq. (1) for one task and the mean query accuracy of theta'_adv and theta'_c."""
        task = self.adversarial_task(support_inputs, support_labels, query_inputs, query_labels)
        objective = self.objective(task, steps)
        return objective.total, objective.accuracy

    def meta_step(
        self,
        tasks: Iterable[Task],
        optimizer: torch.optim.Optimizer,
        clean_optimizer: torch.optim.Optimizer | None = None,
        steps: int | None = None,
    ) -> ADMLObjective:
        """One meta-iteration (lines 3-11) over a meta-batch; returns the mean objective.

        With one ``optimizer`` (learning rate beta), theta takes one joint step on the mean of
        ``L(theta'_adv, D'_c) + L(theta'_c, D'_adv)`` over the tasks. With ``clean_optimizer``
        too, line 11 runs as the paper writes it: ``optimizer`` (beta1) steps on
        ``L(theta'_adv, D'_c)``, then both branches are recomputed at the updated theta and
        ``clean_optimizer`` (beta2) steps on ``L(theta'_c, D'_adv)``. The adversarial samples
        of lines 6 and 9 are generated once, before either step. Task losses are averaged
        over the meta-batch, as in MAML's reference code and learn2learn's examples.
        """
        batch = [self.adversarial_task(*task) for task in tasks]
        if not batch:
            raise ValueError("tasks is empty: a meta-batch needs at least one task")
        if clean_optimizer is None:
            return self._descend(batch, optimizer, steps, lambda o: o.total)
        first = self._descend(batch, optimizer, steps, lambda o: o.adversarial_support_loss)
        second = self._descend(batch, clean_optimizer, steps, lambda o: o.clean_support_loss)
        return ADMLObjective(
            first.adversarial_support_loss,
            second.clean_support_loss,
            first.adversarial_support_accuracy,
            second.clean_support_accuracy,
        )

    def _descend(
        self,
        batch: Sequence[AdversarialTask],
        optimizer: torch.optim.Optimizer,
        steps: int | None,
        select: Callable[[ADMLObjective], Tensor],
    ) -> ADMLObjective:
        optimizer.zero_grad()
        totals = [torch.zeros(()) for _ in ADMLObjective._fields]
        for task in batch:
            objective = self.objective(task, steps)
            (select(objective) / len(batch)).backward()
            totals = [
                t + v.detach().cpu() / len(batch) for t, v in zip(totals, objective, strict=True)
            ]
        optimizer.step()
        return ADMLObjective(*totals)
