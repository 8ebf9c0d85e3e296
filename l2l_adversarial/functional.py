"""Stateless forward passes and inner-loop adaptation on named parameter dictionaries.

The algorithms never copy modules: a task's fast weights are a ``dict`` of tensors that are
differentiable functions of the meta-parameters, and the module is evaluated at them with
``torch.func.functional_call``. This works for any ``nn.Module`` (torchmeta ``MetaModule``
included) and keeps second-order gradients exact.

Example:
    >>> import torch
    >>> from l2l_adversarial.functional import FunctionalModel
    >>> net = FunctionalModel(torch.nn.Linear(4, 2))
    >>> theta = net.parameters()
    >>> x, y = torch.rand(6, 4), torch.tensor([0, 1, 0, 1, 0, 1])
    >>> fast = net.adapt(theta, x, y, lr=0.1, steps=2)
    >>> net(fast, x).shape
    torch.Size([6, 2])
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from l2l_adversarial.models import FeaturesThenHead
from l2l_adversarial.validation import shape_checked

Params = dict[str, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

__all__ = [
    "FunctionalModel",
    "Params",
    "accuracy",
    "descend",
    "kl_divergence",
    "refuse_unused",
    "stateless",
]


def stateless(
    model: Callable[..., Tensor],
    params: Params | None = None,
    leading_args: tuple[Tensor, ...] = (),
) -> Callable[[Tensor], Tensor]:
    """Return a callable computing ``model(*leading_args, x)`` that cannot write into ``model``.

    For an ``nn.Module`` the forward pass uses detached parameters (``params`` if given,
    else the module's own), copies of the buffers and detached ``leading_args``: no ``.grad``
    is touched, no edge joins the caller's autograd graph and BatchNorm running statistics are
    not updated. Any other callable is returned unchanged (it must take ``x`` alone).
    """
    if not isinstance(model, nn.Module):
        return model
    source = params if params is not None else dict(model.named_parameters())
    state: Params = {name: p.detach() for name, p in source.items()}
    state.update({name: b.clone() for name, b in model.named_buffers()})
    leading = tuple(arg.detach() for arg in leading_args)
    return lambda inputs: functional_call(model, state, (*leading, inputs))


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of samples whose arg-max logit is the label (a 0-d tensor); NaN where labels
    are not class indices (regression targets), for which accuracy means nothing.

    Example:
        >>> accuracy(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0])).item()
        0.5
        >>> accuracy(torch.zeros(2, 1), torch.zeros(2, 1)).isnan().item()
        True
    """
    if labels.is_floating_point() or logits.dim() != labels.dim() + 1:
        return torch.full((), float("nan"), device=logits.device)
    return (logits.argmax(dim=-1) == labels).float().mean()


def kl_divergence(outputs: Tensor, clean: Tensor, reduction: str = "mean") -> Tensor:
    """TRADES's robustness term (Zhang et al., 2019): ``KL(softmax(clean) || softmax(outputs))``
    of each row of class scores (the last dimension), averaged over the rows; with
    ``reduction="none"``, each row's. Gradients reach both arguments, as in TRADES.

    Example:
        >>> import math
        >>> two_classes = kl_divergence(torch.tensor([[math.log(3), 0.0]]), torch.zeros(1, 2))
        >>> math.isclose(two_classes.item(), 0.5 * math.log(4 / 3), rel_tol=1e-6)  # (1/2,1/2) vs (3/4,1/4)
        True
    """
    rows = torch.nn.functional.kl_div(
        torch.log_softmax(outputs, -1), torch.log_softmax(clean, -1), reduction="none",
        log_target=True,
    ).sum(-1)  # fmt: skip
    return rows if reduction == "none" else rows.mean()


def descend(params: Tensor, gradient: Tensor, step_size: Tensor | float) -> Tensor:
    """The inner loop's gradient step ``params - step_size * gradient``: one ``add`` for a
    float step size (fewer operations in the meta-gradient's backward pass than a product and
    a difference); a tensor of step sizes broadcasts.

    Example:
        >>> descend(torch.ones(2), torch.tensor([1.0, 2.0]), 0.5).tolist()
        [0.5, 0.0]
    """
    if isinstance(step_size, Tensor):
        return params - step_size * gradient
    return params.add(gradient, alpha=-step_size)


def refuse_unused(names: Sequence[str]) -> None:
    """learn2learn's ``allow_unused=False``: raise ``RuntimeError`` if the support loss of an
    inner loop does not use the trainable parameters ``names`` (none: nothing happens)."""
    if names:
        listed = ", ".join(repr(name) for name in names[:5]) + ("..." if len(names) > 5 else "")
        raise RuntimeError(
            f"the support loss does not use the trainable parameter(s) {listed}, and "
            "allow_unused is False: as learn2learn's MAML, the inner loop refuses them. Pass "
            "allow_unused=True (or allow_nograd=True) to the learner to adapt the other "
            "parameters (unused ones keep their values and get no gradient), or freeze them "
            "(requires_grad=False) with allow_nograd=True"
        )


def _warn_on_tracked_batchnorm(module: nn.Module) -> None:
    tracked = [
        name
        for name, layer in module.named_modules()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats
    ]
    if tracked:
        warnings.warn(
            f"{type(module).__name__} has BatchNorm layers that track running statistics "
            f"({', '.join(tracked[:3])}{'...' if len(tracked) > 3 else ''}). Inner-loop "
            "forward passes on every task update those shared statistics (learn2learn's "
            "clone() shares them too). For MAML-style batch statistics use "
            "track_running_stats=False, as l2l_adversarial.models.CNN4 does.",
            stacklevel=3,
        )


def _contiguous(gradient: Tensor) -> Tensor:
    return gradient.contiguous()


class FunctionalModel:
    """Evaluate ``module`` at arbitrary (fast) parameters, after ``features`` if given.

    Args:
        module: any ``nn.Module`` with at least one trainable parameter: what is adapted.
        loss_fn: task loss, ``loss_fn(logits, labels)``; cross-entropy by default.
        channels_last: run query-set passes (:meth:`query_loss`, attacks on
            :meth:`query_layout` inputs) on 4-D image batches in channels-last memory format.
            The results are the same up to floating-point summation order; on the CPU these
            large-batch passes run about 1.4x faster (``benchmarks/``). Inner-loop passes on
            support sets keep the default format: second-order BatchNorm through channels-last
            tensors is slower there. The module must not call ``.view()`` on activations
            (``.reshape()``, ``flatten`` and ``nn.Flatten`` work).
        features: a feature extractor run before ``module`` at its own (live) parameters,
            never adapted (ANIL: ``module`` is the head). Every method but :meth:`head` takes
            raw inputs; an inner loop runs the features once per set.

    Example:
        >>> from l2l_adversarial import CNN4
        >>> net = CNN4(ways=3, image_size=16)
        >>> anil = FunctionalModel(net.classifier, features=net.features)
        >>> list(anil.parameters())  # what the inner loop adapts
        ['weight', 'bias']
        >>> anil(anil.parameters(), torch.rand(2, 3, 16, 16)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self,
        module: nn.Module,
        loss_fn: LossFn | None = None,
        channels_last: bool = False,
        features: nn.Module | None = None,
    ) -> None:
        for name, given in (("model", module), ("features", features)):
            if given is not None and not isinstance(given, nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module, got {type(given).__name__}")
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError(
                f"{type(module).__name__} has no trainable parameters (requires_grad=True): "
                "meta-learning needs at least one"
            )
        self.module, self.features = module, features
        self.network: nn.Module = module if features is None else FeaturesThenHead(features, module)
        """The whole network on raw inputs (``FeaturesThenHead`` with features)."""
        _warn_on_tracked_batchnorm(self.network)
        self.loss_fn: LossFn = shape_checked(
            loss_fn if loss_fn is not None else nn.functional.cross_entropy
        )
        self.channels_last = bool(channels_last)

    def parameters(self) -> Params:
        """The module's trainable parameters theta, by name (the live tensors, not copies)."""
        return {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def frozen(self) -> list[str]:
        """The names of the module's frozen parameters (``requires_grad=False``)."""
        return [n for n, p in self.module.named_parameters() if not p.requires_grad]

    def check_adaptable(self, allow_nograd: bool, owner: str = "the learner") -> None:
        """learn2learn's ``allow_nograd=False``: raise ``RuntimeError`` naming the frozen
        parameters, if any, unless ``allow_nograd`` (then they stay frozen, unadapted)."""
        if allow_nograd:
            return
        frozen = self.frozen()
        if frozen:
            listed = ", ".join(repr(n) for n in frozen[:5]) + ("..." if len(frozen) > 5 else "")
            raise RuntimeError(
                f"{type(self.module).__name__} has frozen parameters (requires_grad=False): "
                f"{listed}, and {owner} has allow_nograd=False: as learn2learn's MAML, the "
                "inner loop refuses them. Pass allow_nograd=True to the learner to adapt the "
                "trainable parameters only (frozen ones keep their values and get no gradient)"
            )

    def embed(self, inputs: Tensor) -> Tensor:
        """What :attr:`module` takes: ``features(inputs)``, differentiable in the features'
        parameters (``inputs`` themselves without features)."""
        return inputs if self.features is None else self.features(inputs)

    def head(self, params: Params, embedded: Tensor) -> Tensor:
        """Logits of :attr:`module` at ``params`` on :meth:`embed`'s outputs."""
        return functional_call(self.module, params, (embedded,))

    def __call__(self, params: Params, inputs: Tensor) -> Tensor:
        """Logits of the network on ``inputs``, :attr:`module` evaluated at ``params``."""
        return self.head(params, self.embed(inputs))

    def at(self, params: Params) -> Callable[[Tensor], Tensor]:
        """A callable for attacks: the network at detached ``params`` (and features) with
        copied buffers."""
        head = stateless(self.module, params)
        if self.features is None:
            return head
        features = stateless(self.features)
        return lambda inputs: head(features(inputs))

    def loss(self, params: Params, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Task loss and accuracy of the network on ``inputs``, the module at ``params``."""
        return self.scored(self(params, inputs), labels)

    def scored(self, outputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Task loss and accuracy of ``outputs``."""
        return self.loss_fn(outputs, labels), accuracy(outputs.detach(), labels)

    def query_layout(self, inputs: Tensor) -> Tensor:
        """``inputs`` in the memory format of query-set passes (channels-last 4-D batches when
        :attr:`channels_last`); the same values either way."""
        if self.channels_last and inputs.dim() == 4:
            return inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    @contextmanager
    def query_pass(self) -> Iterator[None]:
        """Explain a ``.view()`` failure on channels-last activations inside the block."""
        try:
            yield
        except RuntimeError as error:
            if not self.channels_last or "view size is not compatible" not in str(error):
                raise
            raise RuntimeError(
                f"{type(self.module).__name__} calls .view() on a channels-last activation; "
                "replace it with .reshape() (or torch.flatten), or pass channels_last=False"
            ) from error

    def query_outputs(self, params: Params, inputs: Tensor) -> Tensor:
        """The module's outputs at ``params`` on a query set, in the :meth:`query_layout`
        memory format.

        With :attr:`channels_last`, convolution weight gradients come back channels-last; fast
        weights get them contiguous, so the inner loop's backward pass stays in its faster
        format.
        """
        if not self.channels_last or inputs.dim() != 4:
            return self(params, inputs)
        for p in params.values():
            if p.dim() == 4 and p.requires_grad and not p.is_leaf:
                p.register_hook(_contiguous)
        with self.query_pass():
            return self(params, self.query_layout(inputs))

    def query_loss(self, params: Params, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`loss` on a query set (:meth:`query_outputs`)."""
        return self.scored(self.query_outputs(params, inputs), labels)

    def step(
        self,
        params: Params,
        loss: Tensor,
        lr: float,
        first_order: bool = False,
        allow_unused: bool = True,
    ) -> Params:
        """One gradient-descent step ``params - lr * grad(loss)`` (:func:`descend`).

        Second-order (default) keeps the graph of the gradient so the meta-gradient includes
        the Hessian terms; ``first_order=True`` treats the gradient as a constant (FOMAML).
        Parameters that ``loss`` does not use keep their values, or with ``allow_unused=False``
        raise ``RuntimeError`` (:func:`refuse_unused`), as learn2learn's ``MAML.adapt`` does.
        """
        grads = torch.autograd.grad(
            loss, list(params.values()), create_graph=not first_order, allow_unused=True
        )
        if not allow_unused:
            refuse_unused([name for name, g in zip(params, grads, strict=True) if g is None])
        return {
            name: p if g is None else descend(p, g, lr)
            for (name, p), g in zip(params.items(), grads, strict=True)
        }

    def trajectory(
        self,
        params: Params,
        inputs: Tensor,
        labels: Tensor,
        lr: float,
        steps: int,
        first_order: bool = False,
        allow_unused: bool = True,
    ) -> list[Params]:
        """The fast weights after each of ``steps`` gradient-descent steps on ``(inputs,
        labels)`` from ``params`` (``allow_unused``: as for :meth:`step`). With gradients
        disabled (meta-testing) every step starts from detached weights and returns detached
        ones: no graph is kept. The features (if any) run once, in the caller's grad mode."""
        graph, stepped = torch.is_grad_enabled(), []
        embedded = self.embed(inputs) if steps else inputs
        with torch.enable_grad():
            for _ in range(steps):
                if not graph:
                    params = {name: p.detach().requires_grad_() for name, p in params.items()}
                loss = self.loss_fn(self.head(params, embedded), labels)
                params = self.step(params, loss, lr, first_order or not graph, allow_unused)
                if not graph:
                    params = {name: p.detach() for name, p in params.items()}
                stepped.append(params)
        return stepped

    def adapt(self, params: Params, *args: Any, **kwargs: Any) -> Params:
        """The fast weights after the last of :meth:`trajectory`'s steps (same arguments):
        ``steps`` gradient-descent steps on ``(inputs, labels)`` from ``params``."""
        stepped = self.trajectory(params, *args, **kwargs)
        return stepped[-1] if stepped else params
