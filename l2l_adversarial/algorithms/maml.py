"""MAML (Finn et al., 2017) with the same per-task objective as the adversarial learners, so
the paper's clean baseline trains and evaluates through the same code."""

from __future__ import annotations

from l2l_adversarial.algorithms.base import MetaLearner
from l2l_adversarial.algorithms.task_ops import TaskObjective, TaskOps
from l2l_adversarial.task import Task


class MAML(MetaLearner):
    """learn2learn's ``MAML`` plus ``meta_loss``: ``L(theta - alpha grad L(theta, D), D')``.

    Example:
        >>> import torch, l2l_adversarial as l2la
        >>> maml = l2la.MAML(torch.nn.Linear(8, 3), lr=0.01, adaptation_steps=5)
        >>> xs, ys = torch.rand(3, 8), torch.arange(3)
        >>> maml.meta_loss(xs, ys, torch.rand(6, 8), torch.arange(3).repeat(2)).backward()
    """

    def task_objective(
        self, task: Task, steps: int | None = None, ops: TaskOps | None = None
    ) -> TaskObjective:
        """The MAML objective of one task, differentiable in theta."""
        task, steps, ops = self._prepare(task, steps, ops)
        (adapted,) = ops.adapt([(task.support_inputs, task.support_labels, self.lr)], steps)
        (objective,) = ops.score([(adapted, task.query_inputs, task.query_labels)])
        return objective
