"""MAML (Finn et al., 2017) with the same ``meta_loss`` interface as the adversarial learners,
so the paper's clean baseline trains and evaluates through the same code."""

from __future__ import annotations

from torch import Tensor

from l2l_adversarial.algorithms.base import MetaLearner
from l2l_adversarial.validation import check_task


class MAML(MetaLearner):
    """learn2learn's ``MAML`` plus ``meta_loss``: ``L(theta - alpha grad L(theta, D), D')``.

    Example:
        >>> import torch, l2l_adversarial as l2la
        >>> maml = l2la.MAML(torch.nn.Linear(8, 3), lr=0.01, adaptation_steps=5)
        >>> xs, ys = torch.rand(3, 8), torch.arange(3)
        >>> maml.meta_loss(xs, ys, torch.rand(6, 8), torch.arange(3).repeat(2)).backward()
    """

    def loss_and_accuracy(
        self,
        support_inputs: Tensor,
        support_labels: Tensor,
        query_inputs: Tensor,
        query_labels: Tensor,
        steps: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The MAML objective of one task, differentiable in theta."""
        check_task(support_inputs, support_labels, query_inputs, query_labels)
        adapted = self.adapt_functional(
            self.meta_parameters(),
            support_inputs,
            support_labels,
            self.lr,
            self.resolve_steps(steps),
        )
        return self.functional.query_loss(adapted, query_inputs, query_labels)
