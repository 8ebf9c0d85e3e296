"""L-infinity evasion attacks for few-shot models: FGSM, FGSM with random start, and PGD.

Conventions (read these before choosing ``eps``):

* ``eps`` and ``step_size`` are in the units of the data's *pixel* range ``data_range``
  (default ``(0, 1)``). The paper's "eps = 2" and "eps = 0.2" on 8-bit images are
  ``eps=2/255`` and ``eps=0.2/255`` here.
* If the model expects normalised inputs, pass ``mean`` and ``std``: the attack takes and
  returns inputs in the model's (normalised) space, but perturbs and clamps in pixel space.
* Unlike torchattacks, an attack object is not bound to a model: meta-learning attacks a
  different set of parameters for every task, so the model is an argument of each call,
  ``attack(model, inputs, labels)``. ``model`` may be any callable returning logits: an
  ``nn.Module``, a learn2learn clone whose parameters are non-leaf tensors, a torchmeta
  ``MetaModule`` or a closure over functional parameters.
* Any differentiable ``loss_fn(outputs, targets)`` works (default: cross-entropy on class
  indices), e.g. ``torch.nn.functional.mse_loss`` on float regression targets (of
  the outputs' shape: :func:`~l2l_adversarial.validation.shape_checked` refuses others);
  class-index checks apply only to classification losses (cross-entropy, NLL).
  ``data_range`` is any input range, e.g. ``(-5, 5)`` for torchmeta's ``Sinusoid`` inputs.
* Bad input is refused with an error naming the argument: non-float inputs, inputs whose
  dtype differs from an ``nn.Module``'s parameters, a channel count the first convolution
  does not take, a label count that differs from the input count, an empty batch. With
  ``check_values=True`` (default) the attack also reads values back from the device: inputs
  must be finite and inside ``data_range``, class labels in range, and the model's loss finite
  (a model with NaN weights is refused instead of returning meaningless samples);
  ``check_values=False`` (or ``validation.value_checks(False)``) skips these host reads.
* The attack never writes into the model: ``nn.Module`` parameters are read detached, so no
  ``.grad`` is touched and no edge joins the caller's autograd graph, and buffers are
  copied, so BatchNorm running statistics are never updated by an attack. BatchNorm itself
  behaves as the model's mode says: in ``train()`` mode (as in MAML's transductive
  setting) it normalises with the statistics of the attacked batch, in ``eval()`` mode
  with its running statistics. The result is always detached.

Example:
    >>> import torch
    >>> from l2l_adversarial import FGSM
    >>> model = torch.nn.Linear(4, 3)
    >>> x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    >>> x_adv = FGSM(eps=2 / 255)(model, x, y)
    >>> bool((x_adv - x).abs().max() <= 2 / 255 + 1e-7)
    True
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from l2l_adversarial.functional import kl_divergence, stateless
from l2l_adversarial.validation import (
    check_finite,
    check_inputs_fit,
    check_labels,
    is_classification_loss,
    shape_checked,
    value_checks_enabled,
)

LossFn = Callable[[Tensor, Tensor], Tensor]
Model = Callable[[Tensor], Tensor]

__all__ = [
    "OBJECTIVES",
    "PIXEL_LEVEL",
    "Attack",
    "FGSM",
    "FFGSM",
    "PGD",
    "is_classification_loss",
    "paper_attack",
    "pixel_levels",
]

PIXEL_LEVEL = 1 / 255
OBJECTIVES = ("ce", "kl")
"""What an attack maximises: ``"ce"`` the task loss on the labels; ``"kl"`` TRADES's
``KL(f(x) || f(x'))`` between the model's class distributions on the clean and the
adversarial input (:func:`~l2l_adversarial.functional.kl_divergence`)."""
TRADES_START = 0.001
"""TRADES's random start ``x + 0.001 * N(0, 1)`` for a KL attack without a start of its own
(at ``x`` itself the KL gradient is zero)."""
"""One 8-bit pixel level of images scaled to [0, 1]: the unit of the paper's eps."""


def pixel_levels(levels: float, scale: float = PIXEL_LEVEL) -> float:
    """A radius (or step) given in 8-bit pixel levels, in input units: ``levels * scale``.

    Example:
        >>> pixel_levels(2) == 2 * PIXEL_LEVEL  # the paper's eps = 2
        True
    """
    return levels * scale


def _check_eps(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{name} must be a finite number >= 0 in the units of data_range "
            f"(e.g. 2/255 for the paper's eps=2 on images in [0, 1]), got {value}"
        )
    return float(value)


class Attack(ABC):
    """Base class: an L-infinity attack of radius ``eps`` in pixel space.

    Subclasses implement :meth:`perturb_pixels`. Call an attack as
    ``attack(model, inputs, labels)``.

    ``objective`` (:data:`OBJECTIVES`): ``"ce"`` (default) maximises the task loss,
    ``"kl"`` TRADES's KL divergence from the model's prediction on the clean inputs (labels
    unused; classification losses only), from a random start: the attack's own, or TRADES's
    ``0.001 * N(0, 1)`` (:data:`TRADES_START`). ``generator``: where random starts are drawn
    from (``None``: PyTorch's global generator).
    """

    start_noise: Tensor | None = None
    """A random start given beforehand (:meth:`with_start_noise`); ``None``: drawn."""
    random_start: bool = False
    """Whether the attack starts from a uniform random point of the eps-ball."""
    objective: str = "ce"
    """What the attack maximises (:data:`OBJECTIVES`)."""
    gradient_loss: LossFn
    """What the gradient steps maximise: ``loss_fn`` on the labels (``"ce"``), or the KL
    divergence from the clean outputs (``"kl"``)."""
    batchable: bool = False
    """Whether one call can attack a stack of tasks: the attack treats the rows of a batch
    through the model's summed loss alone (signed input gradients, per-row projection), so
    the task runtime attacks every task of a stack in one call."""
    generator: torch.Generator | None = None
    """Where the random start is drawn from (``None``: PyTorch's global generator)."""

    def __init__(
        self,
        eps: float,
        *,
        data_range: tuple[float, float] = (0.0, 1.0),
        mean: Sequence[float] | Tensor | None = None,
        std: Sequence[float] | Tensor | None = None,
        loss_fn: LossFn | None = None,
        check_values: bool = True,
        objective: str = "ce",
        generator: torch.Generator | None = None,
    ) -> None:
        self.eps = _check_eps("eps", eps)
        lower, upper = (float(v) for v in data_range)
        if not (math.isfinite(lower) and math.isfinite(upper) and lower < upper):
            raise ValueError(
                f"data_range must be (lower, upper) with lower < upper, got {data_range}"
            )
        self.data_range = (lower, upper)
        if (mean is None) != (std is None):
            raise ValueError("mean and std must be given together (or both left as None)")
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float64)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float64)
        if self.std is not None and bool((self.std <= 0).any()):
            raise ValueError(f"std must be positive, got {self.std.tolist()}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be a callable loss_fn(outputs, targets) -> Tensor such as "
                f"torch.nn.functional.mse_loss, got {type(loss_fn).__name__}"
            )
        self.loss_fn: LossFn = shape_checked(
            loss_fn if loss_fn is not None else nn.functional.cross_entropy
        )
        self.check_values = bool(check_values)
        self.generator = generator
        self._set_objective(objective)

    def _set_objective(self, objective: str) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of 'ce', 'kl'; got {objective!r}")
        if objective == "kl" and not is_classification_loss(self.loss_fn):
            raise ValueError(
                "objective='kl' compares the class distributions of a classifier; it needs a "
                "classification loss_fn (cross-entropy, NLL): use objective='ce'"
            )
        self.objective = objective
        self.gradient_loss = self.loss_fn if objective == "ce" else kl_divergence

    @property
    def draws_random(self) -> bool:
        """Whether the attack draws random numbers from :attr:`generator` (a random start
        drawn with :meth:`start_offset`, or a seed)."""
        return self.random_start or self.objective == "kl"

    def maximising(self, objective: str) -> Attack:
        """A copy with ``objective`` (:data:`OBJECTIVES`); the attack itself if it has it.

        Example:
            >>> PGD(eps=0.1).maximising("kl").objective
            'kl'
        """
        if objective == self.objective:
            return self
        copied = copy.copy(self)
        copied._set_objective(objective)
        return copied

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps:.6g}, data_range={self.data_range}{self._kl})"

    @property
    def _kl(self) -> str:
        """``", objective='kl'"`` for a repr where the attack maximises the KL, else ``""``."""
        return ", objective='kl'" if self.objective == "kl" else ""

    def __call__(self, model: Model, inputs: Tensor, labels: Tensor) -> Tensor:
        """Return adversarial copies of ``inputs`` (detached, same space and shape)."""
        self.check_arguments(model, inputs, labels)
        if self.check_values:
            check_finite("inputs", inputs)
        labels = labels.detach()
        if is_classification_loss(self.loss_fn) and labels.dtype != torch.long:
            labels = labels.long()  # class indices of any integer dtype, as the learners
        pixels = self._to_pixels(inputs.detach())
        if self.check_values:
            self.check_range(pixels)
        if self.eps == 0:
            return inputs.detach().clone()
        forward = stateless(model)
        if self.objective == "kl":  # the targets: the clean prediction
            labels = forward(self._to_model_space(pixels)).detach()
        adversarial = self.perturb_pixels(forward, pixels, labels)
        return self._to_model_space(adversarial).detach()

    @abstractmethod
    def perturb_pixels(self, forward: Model, pixels: Tensor, labels: Tensor) -> Tensor:
        """Return the adversarial pixels for clean ``pixels`` (inside ``data_range``)."""

    def check_arguments(self, model: Model, inputs: Tensor, labels: Tensor) -> None:
        """Refuse malformed arguments from their metadata alone (no value is read)."""
        if not callable(model):
            raise TypeError(
                f"model must be a callable returning outputs (an nn.Module, a learn2learn clone, "
                f"...), got {type(model).__name__}"
            )
        for name, tensor in (("inputs", inputs), ("labels", labels)):
            if not isinstance(tensor, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not inputs.is_floating_point():
            raise TypeError(
                f"inputs must be a floating-point tensor (float32, float64, ...), got "
                f"{inputs.dtype}; convert 8-bit images with inputs.float() / 255"
            )
        if inputs.dim() == 0 or labels.dim() == 0 or inputs.shape[0] != labels.shape[0]:
            raise ValueError(
                f"inputs has shape {tuple(inputs.shape)} and labels shape {tuple(labels.shape)}: "
                "pass (N, ...) inputs with one label (or regression target) per input"
            )
        if inputs.shape[0] == 0:
            raise ValueError("inputs is an empty batch (0 samples): attack at least one sample")
        if is_classification_loss(self.loss_fn) and (
            labels.dtype.is_floating_point or labels.is_complex() or labels.dtype == torch.bool
        ):
            raise TypeError(
                f"labels must hold integer class indices (torch.long) for the classification "
                f"loss {getattr(self.loss_fn, '__name__', type(self.loss_fn).__name__)}, got "
                f"{labels.dtype}; for regression targets pass loss_fn= (e.g. "
                "torch.nn.functional.mse_loss)"
            )
        if isinstance(model, nn.Module):
            _check_module_takes(model, inputs)

    # -- helpers shared by the attacks -------------------------------------------------
    def input_gradient(self, forward: Model, pixels: Tensor, labels: Tensor) -> Tensor:
        """Gradient of the objective (:attr:`gradient_loss`) with respect to the pixels (not
        the model's parameters)."""
        with torch.enable_grad():
            pixels = pixels.detach().requires_grad_(True)
            outputs = forward(self._to_model_space(pixels))
            if self.check_values and is_classification_loss(self.gradient_loss):
                check_labels("labels", labels, outputs.shape[-1])
            loss = self.gradient_loss(outputs, labels)
            if self.check_values and value_checks_enabled() and not bool(torch.isfinite(loss)):
                raise ValueError(
                    f"the model's loss on these inputs is {loss.item()}: its parameters or outputs "
                    "hold NaN or inf (a diverged training run?), so no attack is meaningful; "
                    "check the model's weights (torch.isfinite) or reload a good checkpoint"
                )
            (gradient,) = torch.autograd.grad(loss, pixels)
        return gradient

    def project(self, adversarial: Tensor, clean: Tensor) -> Tensor:
        """Clip into the eps-ball around ``clean`` and into ``data_range``."""
        adversarial = torch.max(torch.min(adversarial, clean + self.eps), clean - self.eps)
        return adversarial.clamp(*self.data_range)

    def start(self, pixels: Tensor) -> Tensor:
        """Where the gradient steps start: ``pixels``, or with a random start
        (:attr:`draws_random`) ``pixels`` plus :meth:`start_offset`, inside ``data_range``."""
        if not self.draws_random:
            return pixels
        return (pixels + self.start_offset(pixels, self.generator)).clamp(*self.data_range)

    def start_offset(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        """The random start's offset in the shape of ``like``, drawn from ``generator``:
        ``U(-eps, eps)`` (:attr:`random_start`), else TRADES's ``0.001 * N(0, 1)``; the copy
        made by :meth:`with_start_noise` returns its given noise."""
        if self.start_noise is not None:
            if self.start_noise.shape != like.shape:
                raise ValueError(
                    f"start_noise has shape {tuple(self.start_noise.shape)} but the attacked "
                    f"inputs have shape {tuple(like.shape)}"
                )
            return self.start_noise.to(device=like.device, dtype=like.dtype)
        device = generator.device if generator is not None else like.device
        if not self.random_start:
            noise = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
            return (TRADES_START * noise).to(like.device)
        noise = torch.rand(like.shape, generator=generator, device=device, dtype=like.dtype)
        return ((2 * noise - 1) * self.eps).to(like.device)

    @property
    def input_range(self) -> tuple[float, float] | None:
        """``data_range`` where the inputs are pixels (no ``mean``/``std``), the range an
        input check can hold them to; ``None`` for normalised inputs."""
        return self.data_range if self.mean is None else None

    def drawing_from(self, generator: torch.Generator) -> Attack:
        """A copy that draws its random numbers from ``generator``; an attack that draws none
        is returned itself.

        Example:
            >>> a, b = (PGD(eps=0.1).drawing_from(torch.Generator().manual_seed(0)) for _ in "ab")
            >>> x = torch.zeros(2, 3)
            >>> torch.equal(a.start_offset(x, a.generator), b.start_offset(x, b.generator))
            True
        """
        if not self.draws_random:
            return self
        copied = copy.copy(self)
        copied.generator = generator
        return copied

    def with_start_noise(self, noise: Tensor) -> Attack:
        """A copy whose random start is ``noise`` (drawn beforehand with :meth:`start_offset`):
        a stack of tasks attacked in one call keeps each task's own seeded start.

        Example:
            >>> attack = PGD(eps=0.1)
            >>> start = attack.start_offset(torch.zeros(2, 3), torch.Generator().manual_seed(0))
            >>> torch.equal(attack.with_start_noise(start).start_offset(torch.zeros(2, 3), None),
            ...             start)
            True
        """
        copied = copy.copy(self)
        copied.start_noise = noise
        return copied

    def _channel_view(self, stat: Tensor, like: Tensor) -> Tensor:
        shape = [1] * like.dim()
        if like.dim() >= 3:
            shape[-3] = -1
        else:
            shape[-1] = -1
        return stat.to(device=like.device, dtype=like.dtype).view(shape)

    def _to_pixels(self, inputs: Tensor) -> Tensor:
        if self.mean is None or self.std is None:
            return inputs
        return inputs * self._channel_view(self.std, inputs) + self._channel_view(self.mean, inputs)

    def _to_model_space(self, pixels: Tensor) -> Tensor:
        if self.mean is None or self.std is None:
            return pixels
        return (pixels - self._channel_view(self.mean, pixels)) / self._channel_view(
            self.std, pixels
        )

    def check_range(self, pixels: Tensor) -> None:
        """Raise ``ValueError`` unless ``pixels`` lie inside ``data_range`` (with a hint)."""
        if not value_checks_enabled():  # checked once per meta-batch by the engine
            return
        lower, upper = self.data_range
        slack = 1e-4 * (upper - lower)
        low, high = pixels.min().item(), pixels.max().item()
        if low < lower - slack or high > upper + slack:
            raise ValueError(
                f"inputs (in pixel space) lie in [{low:.4g}, {high:.4g}], outside "
                f"data_range={self.data_range}. Pass the data's own range as data_range= "
                "(e.g. (-5, 5) for torchmeta's Sinusoid inputs) with eps in the same units. "
                "Images from learn2learn's MiniImagenet are in 0-255: divide them by 255 "
                "(l2l_adversarial.data does), or pass data_range=(0, 255); for normalised "
                "inputs pass mean= and std=."
            )


def _check_module_takes(model: nn.Module, inputs: Tensor) -> None:
    """Refuse inputs whose dtype, device or channel count ``model`` cannot take (metadata
    only): :func:`~l2l_adversarial.validation.check_inputs_fit`."""
    check_inputs_fit(model, inputs)


class FGSM(Attack):
    """Fast Gradient Sign Method (Goodfellow et al., 2015), the attack used by ADML.

    ``x_adv = clip(x + eps * sign(grad_x L(f(x), y)), data_range)``; with ``objective="kl"``
    one such step from TRADES's start, projected onto the eps-ball.

    Example:
        >>> attack = FGSM(eps=2 / 255)  # the paper's eps = 2 for 8-bit images in [0, 1]
    """

    batchable = True

    def perturb_pixels(self, forward: Model, pixels: Tensor, labels: Tensor) -> Tensor:
        start = self.start(pixels)
        gradient = self.input_gradient(forward, start, labels)
        return self.project(start + self.eps * gradient.sign(), pixels)


class FFGSM(Attack):
    """FGSM with a uniform random start (Wong et al., 2020, "Fast is better than free").

    ``x0 = x + U(-eps, eps)``; ``x_adv = project(x0 + step_size * sign(grad L(f(x0), y)))``.
    ``step_size`` defaults to ``1.25 * eps`` as in that paper. Named as in torchattacks.

    Example:
        >>> attack = FFGSM(eps=2 / 255, generator=torch.Generator().manual_seed(0))
    """

    batchable = True
    random_start = True

    def __init__(self, eps: float, *, step_size: float | None = None, **kwargs: Any) -> None:
        super().__init__(eps, **kwargs)
        self.step_size = _check_eps(
            "step_size", 1.25 * self.eps if step_size is None else step_size
        )

    def perturb_pixels(self, forward: Model, pixels: Tensor, labels: Tensor) -> Tensor:
        start = self.start(pixels)
        gradient = self.input_gradient(forward, start, labels)
        return self.project(start + self.step_size * gradient.sign(), pixels)


class PGD(Attack):
    """Projected gradient descent in the L-infinity ball (Madry et al., 2018).

    ``steps`` signed-gradient steps of ``step_size`` (default ``2.5 * eps / steps``), each
    projected onto the eps-ball and ``data_range``, from a uniform random start in the ball
    when ``random_start`` (default). With ``steps=1, random_start=False, step_size=eps`` it
    is exactly :class:`FGSM`.

    Example:
        >>> attack = PGD(eps=2 / 255, steps=10)
    """

    batchable = True

    def __init__(
        self,
        eps: float,
        *,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(eps, **kwargs)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        self.steps = steps
        default_step = 2.5 * self.eps / steps
        self.step_size = _check_eps("step_size", default_step if step_size is None else step_size)
        self.random_start = bool(random_start)

    def __repr__(self) -> str:
        return (
            f"PGD(eps={self.eps:.6g}, steps={self.steps}, step_size={self.step_size:.6g}, "
            f"random_start={self.random_start}{self._kl})"
        )

    def perturb_pixels(self, forward: Model, pixels: Tensor, labels: Tensor) -> Tensor:
        adversarial = self.start(pixels)
        for _ in range(self.steps):
            gradient = self.input_gradient(forward, adversarial, labels)
            adversarial = self.project(adversarial + self.step_size * gradient.sign(), pixels)
        return adversarial


def paper_attack(eps: float) -> Attack:
    """The paper's meta-test attack at radius ``eps``: FGSM (Sec. 4), the default of
    :func:`~l2l_adversarial.evaluation.evaluate`.

    Example:
        >>> paper_attack(2 / 255)
        FGSM(eps=0.00784314, data_range=(0.0, 1.0))
    """
    return FGSM(eps)
