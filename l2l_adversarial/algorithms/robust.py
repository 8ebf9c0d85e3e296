"""The robustness term of the adversarial learners: how adversarial query rows are scored.

``robust_loss="ce"`` (default) scores them with the task loss; ``robust_loss="trades"``
(Zhang et al., 2019, "Theoretically Principled Trade-off between Robustness and Accuracy")
replaces that loss with ``CE(f(x), y) + beta * KL(f(x) || f(x_adv))`` on the clean rows ``x``
and their adversarial copies ``x_adv`` at the same parameters, and the attack that makes those
copies maximises the KL divergence instead of the cross-entropy
(:meth:`~l2l_adversarial.attacks.Attack.maximising`). Every adversarial learner takes
``robust_loss`` and ``trades_beta`` (:class:`RobustOptions`) and scores its adversarial query
rows through one :class:`RobustLoss`; each learner's docstring says which term that is.

Example:
    >>> import torch, l2l_adversarial as l2la
    >>> aq = l2la.AdversarialQuerying(torch.nn.Linear(8, 3), lr=0.1, robust_loss="trades")
    >>> aq.robust.kind, aq.robust.beta, aq.robust_attack.objective
    ('trades', 6.0, 'kl')
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor
from typing_extensions import TypedDict

from l2l_adversarial.algorithms.task_ops import (
    PairScore,
    PairSet,
    ScoreSet,
    TaskObjective,
    TaskOps,
)
from l2l_adversarial.attacks import Attack
from l2l_adversarial.validation import check_choice

__all__ = [
    "DEFAULT_TRADES_BETA",
    "ROBUST_LOSSES",
    "RobustLoss",
    "RobustOptions",
    "check_weight",
]

ROBUST_LOSSES = ("ce", "trades")
DEFAULT_TRADES_BETA = 6.0
"""TRADES's weight of the KL term, ``beta = 1 / lambda = 6`` (Zhang et al., 2019, CIFAR-10)."""


class RobustOptions(TypedDict, total=False):
    """The robustness term's keywords, taken by every adversarial learner.

    Attributes:
        robust_loss: ``"ce"`` (default) or ``"trades"``; see :mod:`~l2l_adversarial.algorithms.robust`.
        trades_beta: TRADES's weight beta of the KL term (default 6.0).
    """

    robust_loss: str
    trades_beta: float


def check_weight(name: str, value: float) -> float:
    """A loss weight: a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


class RobustLoss:
    """How a learner scores adversarial rows: ``kind`` (:data:`ROBUST_LOSSES`), and
    ``beta``, the weight of TRADES's KL term.

    Example:
        >>> RobustLoss("trades", beta=3).objective
        'kl'
    """

    def __init__(self, kind: str = "ce", beta: float = DEFAULT_TRADES_BETA) -> None:
        check_choice("robust_loss", kind, ROBUST_LOSSES)
        self.kind = kind
        self.beta = check_weight("trades_beta", beta)

    @property
    def objective(self) -> str:
        """What the attack making the scored rows maximises: ``"ce"`` or ``"kl"``."""
        return "kl" if self.kind == "trades" else "ce"

    def attack(self, attack: Attack) -> Attack:
        """``attack`` maximising :attr:`objective`."""
        return attack.maximising(self.objective)

    def term(self, pair: PairScore) -> Tensor:
        """The robustness term of a scored pair: the adversarial rows' loss (``"ce"``) or the
        KL divergence between the clean and the adversarial outputs (``"trades"``)."""
        return pair.divergence if self.kind == "trades" else pair.adversarial.loss

    def score(
        self, ops: TaskOps, sets: Sequence[PairSet], others: Sequence[ScoreSet] = ()
    ) -> list[TaskObjective]:
        """``others``' task losses, then each set's adversarial score and adversarial
        accuracy: ``L(adversarial rows)`` (``"ce"``, the clean rows unused; one
        :meth:`~TaskOps.score` call with ``others``) or ``L(clean rows) + beta * KL``
        (``"trades"``)."""
        if self.kind == "ce":
            adversarial = [(params, rows, y) for params, _, rows, y in sets]
            return ops.score([*others, *adversarial])
        scored = ops.score(others) if others else []
        return scored + [
            TaskObjective(pair.clean.loss + self.beta * self.term(pair), pair.adversarial.accuracy)
            for pair in ops.score_pairs(sets)
        ]
