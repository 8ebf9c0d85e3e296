"""MAML-AD, the paper's straw-man baseline (Eq. 2-3): plain MAML on mixed clean/adversarial sets.

Both the support set ``D_i`` and the query set ``D'_i`` are the clean samples plus
adversarial copies of a fraction of them; then ``theta'_i = theta - alpha grad L(theta, D_i)``
and theta descends ``L(theta'_i, D'_i)``. With ``adversarial_fraction=1`` (default) every clean
sample is joined by its adversarial copy: the same K + K samples ADML's inner loop sees.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from l2l_adversarial.algorithms.base import AdversarialMetaLearner
from l2l_adversarial.attacks import Attack
from l2l_adversarial.functional import LossFn, Params
from l2l_adversarial.validation import check_task


def per_class_prefix(labels: Tensor, fraction: float) -> Tensor:
    """Boolean mask selecting, for every class, its first ``round(fraction * count)`` samples.

    Deterministic and balanced: e.g. ``fraction=0.4`` of 5 shots selects 2 per class.
    """
    mask = torch.zeros_like(labels, dtype=torch.bool)
    for label in torch.unique(labels):
        (positions,) = torch.nonzero(labels == label, as_tuple=True)
        count = int(math.floor(fraction * positions.numel() + 0.5))
        mask[positions[:count]] = True
    return mask


class MAMLAD(AdversarialMetaLearner):
    """MAML with adversarial training mixed into both the inner loop and the meta-update.

    Args:
        model, lr, first_order, attack, adaptation_steps, loss_fn, channels_last: as for
            :class:`ADML`.
        adversarial_fraction: fraction of each class's clean samples whose adversarial copy
            is added to the set, in ``[0, 1]``; default 1.

    Example:
        >>> import torch, l2l_adversarial as l2la
        >>> mamlad = l2la.MAMLAD(torch.nn.Linear(8, 3), lr=0.01)
        >>> xs, ys = torch.rand(3, 8), torch.arange(3)
        >>> mamlad.meta_loss(xs, ys, torch.rand(6, 8), torch.arange(3).repeat(2)).backward()
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        first_order: bool = False,
        *,
        attack: Attack | None = None,
        adversarial_fraction: float = 1.0,
        adaptation_steps: int = 1,
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
        if isinstance(adversarial_fraction, bool) or not (
            isinstance(adversarial_fraction, (int, float)) and 0.0 <= adversarial_fraction <= 1.0
        ):
            raise ValueError(
                f"adversarial_fraction must be a number in [0, 1], got {adversarial_fraction!r}"
            )
        self.adversarial_fraction = float(adversarial_fraction)

    def mixed(
        self, params: Params, inputs: Tensor, labels: Tensor, query: bool = False
    ) -> tuple[Tensor, Tensor]:
        """The clean samples followed by adversarial copies (against ``params``) of a fraction;
        a ``query`` set comes back in the query passes' memory format."""
        if query:
            inputs = self.functional.query_layout(inputs)
        chosen = per_class_prefix(labels, self.adversarial_fraction)
        if not bool(chosen.any()):
            return inputs, labels
        # Attack the whole set, keep the chosen rows: a sample's adversarial copy is then the
        # same whatever the fraction (and equals the evaluation transform's).
        perturb = self.perturb_query if query else self.perturb
        adversarial = perturb(params, inputs, labels)[chosen]
        return torch.cat([inputs, adversarial]), torch.cat([labels, labels[chosen]])

    def loss_and_accuracy(
        self,
        support_inputs: Tensor,
        support_labels: Tensor,
        query_inputs: Tensor,
        query_labels: Tensor,
        steps: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Eq. (3)'s term for one task: ``L(theta'_i, D'_i)`` with ``theta'_i`` from Eq. (2)."""
        check_task(support_inputs, support_labels, query_inputs, query_labels)
        theta = self.meta_parameters()
        support = self.mixed(theta, support_inputs, support_labels)
        query = self.mixed(theta, query_inputs, query_labels, query=True)
        adapted = self.adapt_functional(theta, *support, self.lr, self.resolve_steps(steps))
        return self.functional.query_loss(adapted, *query)
