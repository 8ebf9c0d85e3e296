"""The layouts of a stack of tasks through one model: inner loops, losses and forward passes for ``T`` tasks
at once, each task at its own (fast) parameters.

Tensors of a stack carry the task dimension first: inputs ``[T, N, ...]``, labels ``[T, N]``,
per-task parameters ``[T, *shape]`` (or theta itself, shared by every task: ``per_task=False``).
Two layouts run a stack, with the same results to floating-point rounding:

* **folded** (models made only of the layers in :func:`fold_obstacle`, CNN4 and MLP among
  them): the ``T`` tasks' networks run as one network ``T`` times as wide. Inputs are folded
  into channels (``[N, T*C, H, W]``), every convolution runs as one grouped convolution with
  ``T`` times the groups, a linear layer as one batched matrix product, and batch
  normalisation, activations and pooling are per channel already. This is what ``vmap``'s
  batching rule does for each convolution, done once for the network, so no layer pays for
  moving the task dimension around; gradients come from plain autograd on the sum of the
  tasks' losses (each task's loss depends on its own slice of the folded parameters only).
* **vmapped** (any other model): ``torch.func.vmap`` over the per-task function.

Where second derivatives are taken, batch and layer normalisation run as primitive operations
(:class:`PrimitiveNormalisation`).

Example:
    >>> import torch
    >>> from l2l_adversarial import CNN4
    >>> from l2l_adversarial.functional import FunctionalModel
    >>> net = FunctionalModel(CNN4(ways=3, in_channels=1, hidden=4, image_size=16))
    >>> inputs, labels = torch.rand(2, 6, 1, 16, 16), torch.arange(3).repeat(2, 2)
    >>> fold_obstacle(net.module, sample_dims=3) is None
    True
    >>> (adapted,) = adapt(net, net.parameters(), False, inputs, labels, 0.1, steps=2)
    >>> adapted["classifier.weight"].shape  # one classifier per task
    torch.Size([2, 3, 4])
    >>> losses(net, adapted, True, inputs, labels)[0].shape
    torch.Size([2])
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode

from l2l_adversarial.functional import (
    FunctionalModel,
    Params,
    accuracy,
    descend,
    kl_divergence,
    refuse_unused,
)
from l2l_adversarial.models import CNN4, MLP

__all__ = [
    "PrimitiveNormalisation",
    "adapt",
    "explain_randomness",
    "fold_obstacle",
    "forward",
    "losses",
    "outputs",
    "scored",
    "vmap_obstacle",
]

ROW_MEAN_LOSSES: tuple[Callable[..., Tensor], ...] = (F.cross_entropy, F.nll_loss, kl_divergence)
"""Losses whose default value is the mean of the ``reduction="none"`` rows."""


# -- which layout ---------------------------------------------------------------------------
def vmap_obstacle(model: nn.Module) -> str | None:
    """Why a stack of tasks cannot run ``model`` (in its current train/eval mode), or ``None``.

    Example:
        >>> vmap_obstacle(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5)))
        "Dropout layer '1' draws random masks, ..."
    """
    for name, layer in model.named_modules():
        label = f"{type(layer).__name__} layer {name!r}"
        if (
            isinstance(layer, nn.modules.batchnorm._BatchNorm)
            and layer.training
            and layer.track_running_stats
        ):
            return (
                f"{label} updates its running statistics in place, which vmap cannot batch; "
                "build it with track_running_stats=False (as CNN4 does)"
            )
        if isinstance(layer, nn.modules.dropout._DropoutNd) and layer.training and layer.p > 0:
            return (
                f"{label} draws random masks, which vmap cannot draw as the sequential "
                "engine does; call .eval() on it or use engine='sequential'"
            )
        if isinstance(layer, (nn.modules.instancenorm._InstanceNorm, nn.RMSNorm)):
            return f"{label}: PyTorch's vmap gives wrong second derivatives through it"
    return None


_RANDOMNESS_ERROR = "called random operation while in randomness error mode"


@contextmanager
def explain_randomness(module: nn.Module) -> Iterator[None]:
    """Inside the block, torch's vmap refusal of a random operation (``F.dropout``,
    ``torch.rand``, ... in a forward pass of its own, which :func:`vmap_obstacle` cannot
    see) becomes a ``ValueError`` that names the model and ``engine='sequential'``.

    Example:
        >>> with explain_randomness(torch.nn.Linear(2, 2)):
        ...     raise RuntimeError("vmap: " + _RANDOMNESS_ERROR)
        Traceback (most recent call last):
        ...
        ValueError: engine='vmap' cannot run Linear: its forward pass draws random numbers ...
    """
    try:
        yield
    except RuntimeError as error:
        if _RANDOMNESS_ERROR not in str(error):
            raise
        raise ValueError(
            f"engine='vmap' cannot run {type(module).__name__}: its forward pass draws random "
            "numbers (F.dropout, torch.rand, ... in training mode), which vmap cannot draw for "
            "each task as the sequential engine does. Use engine='sequential' (or 'auto'), or "
            "call .eval() on the model if it should not draw them"
        ) from error


_CONTAINERS = (nn.Sequential, CNN4, MLP)
"""Modules whose forward pass is their children in registration order."""
_ANY_RANK = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Identity, nn.Dropout,
)  # fmt: skip
_IMAGE_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_FLAT_LAYERS = (nn.Linear, nn.BatchNorm1d)


def fold_obstacle(module: nn.Module, sample_dims: int) -> str | None:
    """Why a stack of tasks cannot run ``module`` folded into channels, on samples of
    ``sample_dims`` dimensions (3 for ``C x H x W`` images), or ``None``.

    Folded stacks run :class:`~torch.nn.Sequential` trees (and CNN4, MLP) of element-wise
    activations, dropout (evaluation mode), 2-D convolutions, pooling and batch normalisation
    on images, ``Flatten()``, and linear layers and 1-D batch normalisation on flat vectors,
    with every parameter trained; any other module runs vmapped.

    Example:
        >>> fold_obstacle(CNN4(ways=3), sample_dims=3) is None
        True
        >>> fold_obstacle(torch.nn.Sequential(torch.nn.LayerNorm(8)), sample_dims=1)
        "LayerNorm layer '0' mixes what folding keeps apart; the stack runs vmapped"
    """
    obstacle = vmap_obstacle(module)
    if obstacle is not None:
        return obstacle
    rank = sample_dims + 1  # with the batch dimension
    for name, layer in module.named_modules():
        label = f"{type(layer).__name__} layer {name!r}"
        if type(layer) in _CONTAINERS:
            continue
        if next(layer.children(), None) is not None:
            return f"{label} has a forward pass of its own; the stack runs vmapped"
        if any(not p.requires_grad for p in layer.parameters(recurse=False)):
            return f"{label} has frozen parameters; the stack runs vmapped"
        if isinstance(layer, nn.MaxPool2d) and layer.return_indices:
            return f"{label} returns indices; the stack runs vmapped"
        if type(layer) is nn.Flatten and (layer.start_dim, layer.end_dim) == (1, -1):
            rank = min(rank, 2)
        elif type(layer) in _ANY_RANK:
            continue
        elif not (
            (type(layer) in _IMAGE_LAYERS and rank == 4)
            or (type(layer) in _FLAT_LAYERS and rank == 2)
        ):
            return f"{label} mixes what folding keeps apart; the stack runs vmapped"
    return None


def _folds(functional: FunctionalModel, inputs: Tensor) -> bool:
    return fold_obstacle(functional.module, inputs.dim() - 2) is None


# -- the three operations on a stack ----------------------------------------------------------
def forward(
    functional: FunctionalModel, params: Params, per_task: bool, tasks: int
) -> Callable[[Tensor], Tensor]:
    """``inputs [T, N, ...] -> outputs [T, N, ...]``: each task's inputs through the model at
    its parameters (``params[name][t]``, or ``params`` for every task if not ``per_task``).

    For first derivatives (attacks): normalisation runs as PyTorch's fused kernels; the
    features (if any) run at their parameters detached."""
    folds: dict[int, bool] = {}  # by the inputs' rank, decided on the first call
    folded: Params | None = None

    def run(inputs: Tensor) -> Tensor:
        nonlocal folded
        inputs = _embedded(functional, inputs, detached=True)
        if inputs.dim() not in folds:
            folds[inputs.dim()] = _folds(functional, inputs)
        if not folds[inputs.dim()]:
            return vmap(functional.head, in_dims=(0 if per_task else None, 0))(params, inputs)
        if folded is None:  # once for every call
            folded = _fold_params(params, per_task, tasks)
        return _folded_outputs(functional.head, folded, inputs, primitive_norms=False)

    return run


def outputs(functional: FunctionalModel, params: Params, per_task: bool, inputs: Tensor) -> Tensor:
    """Each task's outputs ``[T, N, ...]`` at its parameters, differentiable in them."""
    inputs = _embedded(functional, inputs)
    if not _folds(functional, inputs):
        with PrimitiveNormalisation():
            return vmap(functional.head, in_dims=(0 if per_task else None, 0))(params, inputs)
    folded = _fold_params(params, per_task, inputs.shape[0])
    return _folded_outputs(functional.head, folded, inputs, primitive_norms=False)


def scored(functional: FunctionalModel, outputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Each task's loss and accuracy (``[T]`` each; accuracy detached, NaN where it means
    nothing) of its outputs ``[T, N, ...]``."""
    return _task_losses(functional.loss_fn, outputs, labels), vmap(accuracy)(
        outputs.detach(), labels
    )


def losses(
    functional: FunctionalModel, params: Params, per_task: bool, inputs: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """Each task's loss and accuracy (:func:`scored`) at its parameters."""
    return scored(functional, outputs(functional, params, per_task, inputs), labels)


def adapt(
    functional: FunctionalModel,
    params: Params,
    per_task: bool,
    inputs: Tensor,
    labels: Tensor,
    step_size: Tensor | float,
    steps: int,
    first_order: bool = False,
    trajectory: bool = False,
    allow_unused: bool = True,
) -> list[Params]:
    """Each task's fast weights after ``steps`` gradient steps on its ``(inputs, labels)``
    from its ``params`` with its step size (``step_size[t]``, or one float for all): the last
    (a list of one) or, with ``trajectory``, after each step. Differentiable in ``params``
    (second order unless ``first_order``) while gradients are enabled. Parameters that the
    support loss does not use keep their values, or with ``allow_unused=False`` raise
    ``RuntimeError`` (:func:`~l2l_adversarial.functional.refuse_unused`), as in sequence."""
    if steps == 0:
        return [params]
    inputs = _embedded(functional, inputs)  # once: the features are not adapted
    if _folds(functional, inputs):
        return _folded_adapt(
            functional, params, per_task, inputs, labels, step_size, steps, first_order,
            trajectory, allow_unused,
        )  # fmt: skip
    if not allow_unused:  # vmap's gradients of unused parameters are zeros, not None
        refuse_unused(_unused_by_support_loss(functional, params, per_task, inputs, labels))

    def inner_loop(
        p: Params, inputs: Tensor, labels: Tensor, step_size: Tensor | float
    ) -> list[Params]:
        def support_loss(q: Params) -> Tensor:
            return functional.loss_fn(functional.head(q, inputs), labels)

        stepped = []
        for _ in range(steps):
            gradients = grad(support_loss)(p)
            if first_order:
                gradients = {name: g.detach() for name, g in gradients.items()}
            p = {name: descend(w, gradients[name], step_size) for name, w in p.items()}
            stepped.append(p)
        return stepped if trajectory else stepped[-1:]

    in_dims = (0 if per_task else None, 0, 0, 0 if isinstance(step_size, Tensor) else None)
    with PrimitiveNormalisation():
        return vmap(inner_loop, in_dims=in_dims)(params, inputs, labels, step_size)


_UNUSED: weakref.WeakKeyDictionary[FunctionalModel, dict[Any, list[str]]] = (
    weakref.WeakKeyDictionary()
)


def _unused_by_support_loss(
    functional: FunctionalModel, params: Params, per_task: bool, inputs: Tensor, labels: Tensor
) -> list[str]:
    """The parameters that the first task's support loss does not use: one first-order pass
    of that task alone, remembered for the model, the parameters' names and the sets' shapes
    (vmap allows no data-dependent control flow, so the tasks of a stack use the same ones)."""
    key = (
        tuple(params), tuple(inputs.shape[1:]), tuple(labels.shape[1:]), inputs.dtype,
        labels.dtype, inputs.device, functional.module.training, functional.loss_fn,
    )  # fmt: skip
    known = _UNUSED.setdefault(functional, {})
    if key not in known:
        with torch.enable_grad():
            first = {
                name: (p[0] if per_task else p).detach().requires_grad_()
                for name, p in params.items()
            }
            loss = functional.loss_fn(functional.head(first, inputs[0]), labels[0])
            gradients = torch.autograd.grad(loss, list(first.values()), allow_unused=True)
        known[key] = [name for name, g in zip(first, gradients, strict=True) if g is None]
    return known[key]


# -- folded ---------------------------------------------------------------------------------
def _fold_params(params: Params, per_task: bool, tasks: int) -> Params:
    """``[T, d0, ...] -> [T*d0, ...]`` (a view), or theta repeated for each task."""
    if per_task:
        return {name: p.flatten(0, 1) for name, p in params.items()}
    return {name: p.repeat(tasks, *[1] * (p.dim() - 1)) for name, p in params.items()}


def _embedded(functional: FunctionalModel, inputs: Tensor, detached: bool = False) -> Tensor:
    """What the adapted module takes: each task's inputs ``[T, N, ...]`` through the
    features at their parameters, shared by the tasks (detached if ``detached``), folded or
    vmapped as the features allow (the inputs themselves without features)."""
    features = functional.features
    if features is None:
        return inputs
    theta = {n: p.detach() if detached else p for n, p in features.named_parameters()}

    def call(params: Params, x: Tensor) -> Tensor:
        return functional_call(features, params, (x,))

    if fold_obstacle(features, inputs.dim() - 2) is None:
        folded = _fold_params(theta, False, inputs.shape[0])
        return _folded_outputs(call, folded, inputs, primitive_norms=False)
    with PrimitiveNormalisation():
        return vmap(call, in_dims=(None, 0))(theta, inputs)


def _folded_outputs(
    call: Callable[[Params, Tensor], Tensor], folded: Params, inputs: Tensor, primitive_norms: bool
) -> Tensor:
    """``call(folded, inputs)`` on ``T`` tasks' inputs ``[T, N, ...]`` folded into channels."""
    tasks = inputs.shape[0]
    with _Folding(tasks, primitive_norms):
        outputs = call(folded, inputs.transpose(0, 1).flatten(1, 2))
    return outputs.unflatten(1, (tasks, -1)).transpose(0, 1)


def _task_losses(loss_fn: Callable[..., Tensor], outputs: Tensor, labels: Tensor) -> Tensor:
    if loss_fn in ROW_MEAN_LOSSES and outputs.dim() == 3 and labels.dim() == 2:
        rows = loss_fn(outputs.flatten(0, 1), labels.flatten(), reduction="none")
        return rows.view(labels.shape).mean(1)
    return vmap(loss_fn)(outputs, labels)


def _folded_adapt(
    functional: FunctionalModel,
    params: Params,
    per_task: bool,
    inputs: Tensor,
    labels: Tensor,
    step_size: Tensor | float,
    steps: int,
    first_order: bool,
    trajectory: bool,
    allow_unused: bool = True,
) -> list[Params]:
    tasks, graph = inputs.shape[0], torch.is_grad_enabled()
    second_order = graph and not first_order
    folded = _fold_params(params, per_task, tasks)
    rates: dict[str, Tensor | float] = {
        name: step_size
        if not isinstance(step_size, Tensor)
        else step_size.repeat_interleave(p.shape[0] // tasks).view(-1, *[1] * (p.dim() - 1))
        for name, p in folded.items()
    }
    stepped: list[Params] = []
    with torch.enable_grad():
        for _ in range(steps):
            if not graph:  # evaluation: each step from detached fast weights
                folded = {name: p.detach().requires_grad_() for name, p in folded.items()}
            outputs = _folded_outputs(functional.head, folded, inputs, second_order)
            gradients = torch.autograd.grad(
                _task_losses(functional.loss_fn, outputs, labels).sum(),
                list(folded.values()),
                create_graph=second_order,
                retain_graph=graph,
                allow_unused=True,
            )
            if not allow_unused:
                refuse_unused([n for n, g in zip(folded, gradients, strict=True) if g is None])
            folded = {
                name: p if g is None else descend(p, g, rates[name])
                for (name, p), g in zip(folded.items(), gradients, strict=True)
            }
            stepped.append(folded)
    kept = stepped if trajectory else stepped[-1:]
    return [
        {name: (p if graph else p.detach()).unflatten(0, (tasks, -1)) for name, p in step.items()}
        for step in kept
    ]


class _Replacing(TorchFunctionMode):
    """While active, calls of the functions in ``replacements`` go to their replacements."""

    def __init__(self, replacements: dict[Callable[..., Any], Callable[..., Any]]) -> None:
        super().__init__()
        self.replacements = replacements

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return self.replacements.get(func, func)(*args, **(kwargs or {}))


class _Folding(_Replacing):
    """While active, the layers see ``T`` tasks folded into channels: convolutions run
    grouped by task, linear layers as one batched matrix product, batch normalisation with
    each task's running statistics (evaluation mode); with ``primitive_norms`` as primitive
    operations (a shorter double backward than the fused kernel's)."""

    def __init__(self, tasks: int, primitive_norms: bool) -> None:
        super().__init__(
            {
                F.conv2d: functools.partial(_grouped_conv2d, tasks),
                F.linear: functools.partial(_batched_linear, tasks),
                F.batch_norm: functools.partial(_folded_batch_norm, tasks, primitive_norms),
            }
        )


def _grouped_conv2d(
    tasks: int,
    inputs: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
) -> Tensor:
    return F.conv2d(inputs, weight, bias, stride, padding, dilation, groups * tasks)


def _batched_linear(
    tasks: int, inputs: Tensor, weight: Tensor, bias: Tensor | None = None
) -> Tensor:
    rows = inputs.shape[0]
    per_task = inputs.reshape(rows, tasks, -1).transpose(0, 1)  # [T, N, in]
    weights = weight.view(tasks, -1, weight.shape[-1]).transpose(1, 2)  # [T, in, out]
    if bias is None:
        outputs = torch.bmm(per_task, weights)
    else:
        outputs = torch.baddbmm(bias.view(tasks, 1, -1), per_task, weights)
    return outputs.transpose(0, 1).reshape(rows, -1)


def _folded_batch_norm(
    tasks: int,
    primitive: bool,
    inputs: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> Tensor:
    """``F.batch_norm``'s arguments after ``running_var``, passed on."""
    if running_mean is not None and running_var is not None:  # evaluation mode (see vmap_obstacle)
        running_mean, running_var = running_mean.repeat(tasks), running_var.repeat(tasks)
    norm = _batch_norm if primitive else F.batch_norm
    return norm(inputs, running_mean, running_var, *args, **kwargs)


# -- normalisation from primitives ------------------------------------------------------------
class PrimitiveNormalisation(_Replacing):
    """While active, batch and layer normalisation are composed from primitive operations.

    Under vmap, PyTorch's batching rules for the fused normalisation kernels give wrong
    second derivatives (pytorch/functorch#534); written with ``var_mean`` and ``rsqrt`` the
    same functions differentiate exactly (and their double backward is shorter than the fused
    kernel's).
    """

    def __init__(self) -> None:
        super().__init__({F.batch_norm: _batch_norm, F.layer_norm: _layer_norm})


def _batch_norm(
    inputs: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    channel = [1, -1] + [1] * (inputs.dim() - 2)
    if training and running_mean is None and running_var is None:
        dims = [0, *range(2, inputs.dim())]
        var, mean = torch.var_mean(inputs, dim=dims, correction=0, keepdim=True)
    elif not training and running_mean is not None and running_var is not None:
        mean, var = running_mean.view(channel), running_var.view(channel)
    else:  # running statistics updated in place: vmap_obstacle refuses such models
        return F.batch_norm(
            inputs, running_mean, running_var, weight, bias, training, momentum, eps
        )
    normalised = (inputs - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        normalised = normalised * weight.view(channel)
    return normalised if bias is None else normalised + bias.view(channel)


def _layer_norm(
    inputs: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    dims = list(range(-len(normalized_shape), 0))
    var, mean = torch.var_mean(inputs, dim=dims, correction=0, keepdim=True)
    normalised = (inputs - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        normalised = normalised * weight
    return normalised if bias is None else normalised + bias
