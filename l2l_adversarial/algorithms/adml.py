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
identical to two passes. :mod:`l2l_adversarial.engines` evaluates a whole meta-batch, on a
GPU with all tasks and both branches batched by ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from l2l_adversarial.algorithms.base import (
    ATTACK_TARGETS,
    AdversarialMetaLearner,
    check_step_size,
)
from l2l_adversarial.attacks import FGSM, Attack
from l2l_adversarial.functional import LossFn, Params
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
        channels_last: evaluate and attack the query sets in channels-last memory format (same
            results, faster on the CPU; see :class:`~l2l_adversarial.functional.FunctionalModel`).

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

    def adversarial_task(
        self,
        support_inputs: Tensor,
        support_labels: Tensor,
        query_inputs: Tensor,
        query_labels: Tensor,
    ) -> AdversarialTask:
        """Lines 5-6 and 8-9: adversarial copies of the support and query sets against theta."""
        task = Task(support_inputs, support_labels, query_inputs, query_labels)
        check_task(*task)
        return self._attack_task(self.meta_parameters(), task)

    def objective(self, task: AdversarialTask, steps: int | None = None) -> ADMLObjective:
        """Line 7 and the two losses of line 11 for one task, differentiable in theta."""
        return self._objective(task, self.resolve_steps(steps))

    def task_objective(self, task: Task, steps: int | None = None) -> ADMLObjective:
        """Lines 5-11 for one task: ``objective(adversarial_task(*task), steps)``.

        With FGSM (:attr:`shares_support_pass`) line 6 and the first clean step of line 7 come
        from one backward pass; the result is identical.

        Example:
            >>> import torch, l2l_adversarial as l2la
            >>> adml = l2la.ADML(torch.nn.Linear(8, 3), lr=0.01)
            >>> task = l2la.Task(torch.rand(3, 8), torch.arange(3), torch.rand(6, 8),
            ...                  torch.arange(3).repeat(2))
            >>> adml.task_objective(task).total.backward()
        """
        task = Task(*task)
        check_task(*task)
        steps = self.resolve_steps(steps)
        theta = self.meta_parameters()
        if not self.shares_support_pass:
            return self._objective(self._attack_task(theta, task), steps)
        support_adversarial, clean_first_step = self._fgsm_and_clean_step(
            theta, task.support_inputs, task.support_labels
        )
        adversarial = AdversarialTask(
            support_clean=task.support_inputs,
            support_adversarial=support_adversarial,
            support_labels=task.support_labels,
            query_clean=task.query_inputs,
            query_adversarial=self._query_adversarial(theta, task.query_inputs, task.query_labels),
            query_labels=task.query_labels,
        )
        return self._objective(adversarial, steps, clean_first_step)

    def meta_loss(
        self,
        support_inputs: Tensor,
        support_labels: Tensor,
        query_inputs: Tensor,
        query_labels: Tensor,
        steps: int | None = None,
    ) -> Tensor:
        """Eq. (1) for one task: ``L(theta'_adv, D'_c) + L(theta'_c, D'_adv)``."""
        task = Task(support_inputs, support_labels, query_inputs, query_labels)
        return self.task_objective(task, steps).total

    def loss_and_accuracy(
        self,
        support_inputs: Tensor,
        support_labels: Tensor,
        query_inputs: Tensor,
        query_labels: Tensor,
        steps: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Eq. (1) for one task and the mean query accuracy of theta'_adv and theta'_c."""
        task = Task(support_inputs, support_labels, query_inputs, query_labels)
        objective = self.task_objective(task, steps)
        return objective.total, objective.accuracy

    def meta_batch_loss(
        self, tasks: Iterable[Task], steps: int | None = None, engine: str = "auto"
    ) -> Tensor:
        """Mean of Eq. (1) over a meta-batch, differentiable in theta.

        ``engine`` is ``"sequential"`` (task after task), ``"vmap"`` (all tasks and both
        branches batched with ``torch.func``) or ``"auto"`` (vmap on CUDA); see
        :mod:`l2l_adversarial.engines`.

        Example:
            >>> loss = adml.meta_batch_loss(tasks)   # == mean of adml.meta_loss(*task)
            >>> loss.backward(); optimizer.step()
        """
        from l2l_adversarial import engines  # engines builds on this module

        return engines.meta_batch_objective(self, tasks, steps, engine).total

    def meta_step(
        self,
        tasks: Iterable[Task],
        optimizer: torch.optim.Optimizer,
        clean_optimizer: torch.optim.Optimizer | None = None,
        steps: int | None = None,
        *,
        engine: str = "auto",
    ) -> ADMLObjective:
        """One meta-iteration (lines 3-11) over a meta-batch; returns the mean objective.

        With one ``optimizer`` (learning rate beta), theta takes one joint step on the mean of
        ``L(theta'_adv, D'_c) + L(theta'_c, D'_adv)`` over the tasks. With ``clean_optimizer``
        too, line 11 runs as the paper writes it: ``optimizer`` (beta1) steps on
        ``L(theta'_adv, D'_c)``, then both branches are recomputed at the updated theta and
        ``clean_optimizer`` (beta2) steps on ``L(theta'_c, D'_adv)``. The adversarial samples
        of lines 6 and 9 are generated once, before either step. Task losses are averaged
        over the meta-batch, as in MAML's reference code and learn2learn's examples.

        ``engine`` as for :meth:`meta_batch_loss`. The sequential engine attacks each task as
        ``tasks`` yields it and keeps one task's graph in memory at a time; the returned
        values are detached tensors on the parameters' device.
        """
        from l2l_adversarial import engines  # engines builds on this module

        vmap_engine = engines.resolve_engine(self, engine) == "vmap"
        steps = self.resolve_steps(steps)
        if clean_optimizer is None:
            joint: Iterable[ADMLObjective] = (
                [engines.meta_batch_objective(self, tasks, steps, engine)]
                if vmap_engine
                else (self.task_objective(task, steps) for task in tasks)
            )
            return self._descend(joint, optimizer, lambda o: o.total)
        batch = engines.adversarial_tasks(self, tasks, engine)

        def objectives() -> Iterable[ADMLObjective]:
            if vmap_engine:
                return [engines.mean_objective(self, batch, steps, engine)]
            return (self.objective(task, steps) for task in batch)

        first = self._descend(objectives(), optimizer, lambda o: o.adversarial_support_loss)
        second = self._descend(objectives(), clean_optimizer, lambda o: o.clean_support_loss)
        return ADMLObjective(
            first.adversarial_support_loss,
            second.clean_support_loss,
            first.adversarial_support_accuracy,
            second.clean_support_accuracy,
        )

    # -- the steps of Algorithm 1 for one task ---------------------------------------------
    def _attack_task(self, theta: Params, task: Task) -> AdversarialTask:
        """Lines 5-6 and 8-9 for a validated task (the query set first, then the support)."""
        query_adversarial = self._query_adversarial(theta, task.query_inputs, task.query_labels)
        return AdversarialTask(
            support_clean=task.support_inputs,
            support_adversarial=self.perturb(theta, task.support_inputs, task.support_labels),
            support_labels=task.support_labels,
            query_clean=task.query_inputs,
            query_adversarial=query_adversarial,
            query_labels=task.query_labels,
        )

    def _query_adversarial(self, theta: Params, inputs: Tensor, labels: Tensor) -> Tensor | None:
        """Line 9 against theta; ``None`` when ``D'_adv`` is made against theta'_c instead."""
        if self.attack_target != "initial":
            return None
        return self.perturb_query(theta, inputs, labels)

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

    def _objective(
        self, task: AdversarialTask, steps: int, clean_first_step: Params | None = None
    ) -> ADMLObjective:
        """Line 7 and line 11's losses; ``clean_first_step`` is theta'_c after one step."""
        theta = self.meta_parameters()
        theta_adv = self.adapt_functional(
            theta, task.support_adversarial, task.support_labels, self.lr, steps
        )
        if clean_first_step is None:
            theta_c = self.adapt_functional(
                theta, task.support_clean, task.support_labels, self.clean_lr, steps
            )
        else:
            theta_c = self.adapt_functional(
                clean_first_step, task.support_clean, task.support_labels, self.clean_lr, steps - 1
            )
        query_adversarial = task.query_adversarial
        if query_adversarial is None:
            query_adversarial = self.perturb_query(theta_c, task.query_clean, task.query_labels)
        loss_adv, acc_adv = self.functional.query_loss(
            theta_adv, task.query_clean, task.query_labels
        )
        loss_c, acc_c = self.functional.query_loss(theta_c, query_adversarial, task.query_labels)
        return ADMLObjective(loss_adv, loss_c, acc_adv, acc_c)

    def _descend(
        self,
        objectives: Iterable[ADMLObjective],
        optimizer: torch.optim.Optimizer,
        select: Callable[[ADMLObjective], Tensor],
    ) -> ADMLObjective:
        """Backpropagate ``select`` of each objective as it comes (one graph alive at a time),
        average the gradients over them, take one optimizer step; returns the mean objective."""
        optimizer.zero_grad()
        sums: list[Tensor] = []
        count = 0
        for objective in objectives:
            select(objective).backward()
            values = [v.detach() for v in objective]
            sums = values if not sums else [s + v for s, v in zip(sums, values, strict=True)]
            count += 1
        if count == 0:
            raise ValueError("tasks is empty: a meta-batch needs at least one task")
        if count > 1:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.div_(count)
        optimizer.step()
        return ADMLObjective(*(s / count for s in sums))
