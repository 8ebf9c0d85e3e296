"""AutoAttack (Croce and Hein, 2020) through torchattacks, behind this package's attack interface.

torchattacks' attacks bind an ``nn.Module`` at construction and expect inputs in [0, 1];
meta-learning attacks a different adapted model per task, and models here may be any
callable. :class:`AutoAttack` builds the standard ensemble from torchattacks' attacks
(APGD-CE, APGD-T, FAB-T and Square with 5000 queries) around the model of each call, with the
number of classes read from the model's logits (APGD-T needs at least 4), inputs mapped from ``data_range`` to [0, 1], and the ensemble's
seed drawn from ``generator`` (or ``seed``) so results are reproducible. torchattacks seeds
the global RNG inside its attacks; that happens inside :func:`torch.random.fork_rng`, so the
caller's random streams are left as they were.

torchattacks is an optional dependency (``pip install l2l-adversarial[autoattack]``).

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5))
    >>> x, y = torch.rand(10, 1, 4, 4), torch.arange(5).repeat(2)
    >>> x_adv = AutoAttack(eps=8 / 255, seed=0)(model, x, y)
    >>> bool((x_adv - x).abs().max() <= 8 / 255 + 1e-6)
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from l2l_adversarial.attacks import Attack, Model

__all__ = ["AutoAttack"]


class _Unit(nn.Module):
    """A callable in pixel space of ``data_range`` as an ``nn.Module`` on [0, 1] inputs."""

    def __init__(self, forward: Model, lower: float, upper: float, like: Tensor) -> None:
        super().__init__()
        self.call, self.lower, self.upper = forward, lower, upper
        # torchattacks reads its device from the first parameter
        self.anchor = nn.Parameter(torch.zeros(0, device=like.device), requires_grad=False)

    def forward(self, unit: Tensor) -> Tensor:
        return self.call(self.lower + unit * (self.upper - self.lower))


class AutoAttack(Attack):
    """The standard AutoAttack ensemble (L-infinity), made of torchattacks' attacks, for the
    model of each call: APGD-CE, APGD-T, FAB-T, then Square, each on the samples the previous
    ones left correctly classified (torchattacks' ``MultiAttack``), as torchattacks'
    ``AutoAttack(version="standard")`` composes them.

    Args:
        eps: radius in the units of ``data_range`` (8/255 is the robustness literature's).
        square_queries: queries of the black-box Square attack (AutoAttack's: 5000; it
            dominates the cost on samples the gradient attacks leave robust).
        seed: the ensemble's seed when ``generator`` is ``None`` (default 0).
        generator: if given, every call draws the ensemble's seed from it (the evaluation
            seeds it per task, like PGD's random start).
        kwargs: as for :class:`~l2l_adversarial.attacks.Attack` (``data_range``, ``mean``,
            ``std``); the losses are the ensemble's own (cross-entropy, DLR, margin).
    """

    draws_random = True  # the ensemble's seed, drawn from generator when there is one

    def __init__(
        self,
        eps: float,
        *,
        square_queries: int = 5000,
        seed: int = 0,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        if "loss_fn" in kwargs:
            raise ValueError("AutoAttack uses its own losses (CE, DLR, margin); drop loss_fn")
        super().__init__(eps, **kwargs)
        if (
            isinstance(square_queries, bool)
            or not isinstance(square_queries, int)
            or square_queries < 1
        ):
            raise ValueError(
                f"square_queries must be an integer >= 1 (AutoAttack: 5000), got {square_queries!r}"
            )
        self.square_queries, self.seed, self.generator = square_queries, int(seed), generator

    def _set_objective(self, objective: str) -> None:
        if objective != "ce":
            raise ValueError(
                f"AutoAttack maximises its own losses (CE, DLR, margin), not objective="
                f"{objective!r}; for TRADES's attack use PGD(...).maximising('kl')"
            )
        super()._set_objective(objective)

    def __repr__(self) -> str:
        return (
            f"AutoAttack(eps={self.eps:.6g}, APGD-CE, APGD-T, FAB-T, "
            f"Square({self.square_queries} queries), torchattacks)"
        )

    def perturb_pixels(self, forward: Model, pixels: Tensor, labels: Tensor) -> Tensor:
        try:
            import torchattacks
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "evaluate.attack 'autoattack' needs torchattacks: "
                "pip install 'l2l-adversarial[autoattack]' (or pip install torchattacks)"
            ) from error
        lower, upper = self.data_range
        scale = upper - lower
        seed = self.seed
        if self.generator is not None:
            seed = int(torch.randint(2**31 - 1, (), generator=self.generator))
        with torch.no_grad():
            classes = int(forward(pixels[:1]).shape[-1])
        if classes < 4:
            raise ValueError(
                f"AutoAttack's APGD-T needs at least 4 classes, the model has {classes}; "
                "use PGD (evaluate.attack: pgd) for 2- and 3-way tasks"
            )
        model = _Unit(forward, lower, upper, pixels)
        eps = self.eps / scale
        ensemble = torchattacks.MultiAttack(
            [
                torchattacks.APGD(model, eps=eps, seed=seed, loss="ce", n_restarts=1),
                torchattacks.APGDT(model, eps=eps, seed=seed, n_classes=classes, n_restarts=1),
                torchattacks.FAB(model, eps=eps, seed=seed, multi_targeted=True,
                                 n_classes=classes, n_restarts=1),
                torchattacks.Square(model, eps=eps, seed=seed, n_queries=self.square_queries,
                                    n_restarts=1),
            ]
        )  # fmt: skip
        with torch.random.fork_rng(devices=[pixels.device] if pixels.is_cuda else []):
            unit = ensemble((pixels - lower) / scale, labels)
        return self.project(lower + unit.to(pixels.dtype) * scale, pixels)
