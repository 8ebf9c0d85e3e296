"""Input checks shared by the attacks, the algorithms and the engines: fail early, name the fix.

Two kinds of checks:

* **metadata** (types, dtypes, shapes, devices): free, always on;
* **values** (label range, finiteness, an attack's data range): they read tensors on the
  host, which stalls a GPU. A single task checked through a learner's ``meta_loss`` reads them
  as before; :func:`l2l_adversarial.engines.meta_step` checks a whole meta-batch with one
  host read (:func:`check_meta_batch`) and runs the meta-iteration with value checks off.
  ``with value_checks(False):`` turns them off in the current thread (hot loops on data
  that was checked where it was built: ``train`` checks each meta-batch in the data
  pipeline).

Example:
    >>> import torch
    >>> with value_checks(False):
    ...     check_finite("x", torch.tensor([float("nan")]))  # not read: no error
    >>> value_checks_enabled()
    True
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from l2l_adversarial.models import FeaturesThenHead
from l2l_adversarial.task import Task

__all__ = [
    "check_choice",
    "check_finite",
    "check_inputs_fit",
    "check_labels",
    "check_meta_batch",
    "check_task",
    "check_task_metadata",
    "is_classification_loss",
    "shape_checked",
    "value_checks",
    "value_checks_enabled",
]


class _ValueChecks(threading.local):
    """Each thread's stack of :func:`value_checks` settings (a thread building tasks while
    the training loop runs with checks off still checks)."""

    def __init__(self) -> None:
        self.stack = [True]


_value_checks = _ValueChecks()
CLASSIFICATION_LOSSES: tuple[Callable[..., Tensor], ...] = (
    nn.functional.cross_entropy,
    nn.functional.nll_loss,
)


def value_checks_enabled() -> bool:
    """Whether checks that read tensor values on the host run (see :func:`value_checks`)."""
    return _value_checks.stack[-1]


@contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the value checks on or off inside the block, in this thread (metadata checks
    always run)."""
    _value_checks.stack.append(bool(enabled))
    try:
        yield
    finally:
        _value_checks.stack.pop()


def is_classification_loss(loss_fn: Callable[..., Tensor]) -> bool:
    """Whether ``loss_fn`` takes class indices (cross-entropy, NLL): class-label checks apply.

    Example:
        >>> is_classification_loss(torch.nn.functional.cross_entropy)
        True
        >>> is_classification_loss(torch.nn.functional.mse_loss)
        False
    """
    if isinstance(loss_fn, ShapeCheckedLoss):
        loss_fn = loss_fn.loss_fn
    return loss_fn in CLASSIFICATION_LOSSES or isinstance(
        loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)
    )


def check_finite(name: str, tensor: Tensor) -> None:
    """Raise ``ValueError`` if ``tensor`` holds NaN or infinity (a value check)."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not value_checks_enabled() or not tensor.is_floating_point():
        return
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(
            f"{name} holds {bad} non-finite value(s) (NaN or inf); clean or re-load the data"
        )


def _check_label_dtype(name: str, labels: Tensor) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(
            f"{name} must hold integer class indices (torch.long; other integer types are "
            f"converted), got {labels.dtype}; for regression targets pass a regression "
            "loss_fn (e.g. torch.nn.functional.mse_loss)"
        )
    if labels.dim() != 1:
        raise ValueError(
            f"{name} must be 1-D (one class index per sample), got shape {tuple(labels.shape)}"
        )


def check_labels(name: str, labels: Tensor, ways: int) -> None:
    """Raise unless ``labels`` is a 1-D integer tensor with values in ``[0, ways)``."""
    _check_label_dtype(name, labels)
    if not value_checks_enabled() or not labels.numel():
        return
    low, high = (int(v) for v in torch.stack([labels.min(), labels.max()]).tolist())
    if low < 0 or high >= ways:
        raise ValueError(
            f"{name} must lie in [0, {ways}) for a {ways}-way task, got values in "
            f"[{low}, {high}]; relabel each task's classes 0..ways-1 "
            "(learn2learn's RemapLabels transform does this)"
        )


def check_choice(name: str, value: object, accepted: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``accepted``."""
    if value not in accepted:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, accepted))}; got {value!r}")


def check_task_metadata(
    task: Sequence[Tensor],
    classification: bool = True,
    model: nn.Module | None = None,
    where: str = "task",
) -> Task:
    """Check a task from tensor metadata only (no host read); integer labels become long.

    With ``model``, the inputs must match its parameters' dtype and device and, where its
    first layer is a convolution or a linear layer, its input channels or features.
    """
    if len(task) != 4:
        raise ValueError(
            f"{where} must be (support_inputs, support_labels, query_inputs, query_labels), "
            f"got {len(task)} items"
        )
    checked = []
    for name, inputs, labels in (
        ("support", task[0], task[1]),
        ("query", task[2], task[3]),
    ):
        for suffix, tensor in (("inputs", inputs), ("labels", labels)):
            if not isinstance(tensor, Tensor):
                raise TypeError(
                    f"{where}: {name}_{suffix} must be a torch.Tensor, got {type(tensor).__name__}"
                )
        if classification:
            _check_label_dtype(f"{where}: {name}_labels", labels)
            if labels.dtype != torch.long:
                labels = labels.long()
        if inputs.dim() < 1 or labels.dim() < 1 or inputs.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{where}: {name}_inputs has shape {tuple(inputs.shape)} and {name}_labels shape "
                f"{tuple(labels.shape)}: expected (N, ...) inputs with N labels"
            )
        if inputs.shape[0] == 0:
            raise ValueError(
                f"{where}: {name} set is empty: a task needs at least one {name} sample"
            )
        checked += [inputs, labels]
    support_inputs, _, query_inputs, _ = checked
    if support_inputs.shape[1:] != query_inputs.shape[1:]:
        raise ValueError(
            f"{where}: support samples have shape {tuple(support_inputs.shape[1:])} but query "
            f"samples {tuple(query_inputs.shape[1:])}: both sets must come from the same data"
        )
    if model is not None:
        check_inputs_fit(model, support_inputs, where)
        check_inputs_fit(model, query_inputs, where)
    return Task(*checked)


def check_inputs_fit(model: nn.Module, inputs: Tensor, where: str = "") -> None:
    """Refuse ``inputs`` that ``model`` cannot take, from metadata only (no host read): a
    floating-point dtype or a device other than its parameters', or a channel count other
    than its first convolution's (a feature count other than its own ``nn.Linear``'s).

    A :class:`~l2l_adversarial.models.FeaturesThenHead` (a learner with ``features=``) is
    checked as its features against the inputs, and its head against the features' outputs:
    the inputs' dtype and device.

    The one check of model against inputs for direct calls (``meta_loss``), the engines,
    :func:`~l2l_adversarial.evaluation.evaluate` and the attacks.

    Example:
        >>> check_inputs_fit(nn.Conv2d(1, 4, 3), torch.rand(2, 3, 8, 8))
        Traceback (most recent call last):
        ...
        ValueError: inputs have 3 channel(s) (shape (2, 3, 8, 8)) but Conv2d's first ...
    """
    at = f"{where}: " if where else ""
    if isinstance(model, FeaturesThenHead):
        check_inputs_fit(model.features, inputs, where)
        _check_dtype_and_device(
            f"the head {type(model.head).__name__} (on the features' outputs)", model.head,
            inputs, at,
        )  # fmt: skip
        return
    name = type(model).__name__
    _check_dtype_and_device(name, model, inputs, at)
    first = next(
        (m for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))),
        None,
    )
    if isinstance(first, nn.modules.conv._ConvNd):
        spatial = len(first.kernel_size)
        if inputs.dim() in (spatial + 1, spatial + 2):
            channels = inputs.shape[-spatial - 1]
            if channels != first.in_channels:
                raise ValueError(
                    f"{at}inputs have {channels} channel(s) (shape {tuple(inputs.shape)}) "
                    f"but {name}'s first convolution takes {first.in_channels}; pass "
                    f"(N, {first.in_channels}, ...) inputs or build the model with "
                    f"in_channels={channels}"
                )
    if (
        isinstance(first, nn.Linear)
        and next(iter(model.modules())) is first
        and inputs.shape[-1] != first.in_features
    ):
        raise ValueError(
            f"{at}inputs have {inputs.shape[-1]} features (shape {tuple(inputs.shape)}) "
            f"but {name} takes {first.in_features}; pass (N, {first.in_features}) inputs"
        )


def _check_dtype_and_device(name: str, model: nn.Module, inputs: Tensor, at: str) -> None:
    """Floating-point ``inputs`` of the dtype and on the device of ``model``'s parameters."""
    parameter = next((p for p in model.parameters() if p.is_floating_point()), None)
    if parameter is None or not inputs.is_floating_point():
        return
    if inputs.dtype != parameter.dtype:
        raise TypeError(
            f"{at}inputs are {inputs.dtype} but {name}'s parameters are "
            f"{parameter.dtype}; convert one of them (inputs.to({parameter.dtype}) for "
            f"every set of the task, or model.to({inputs.dtype}) before building the "
            "learner)"
        )
    if inputs.device != parameter.device:
        raise ValueError(
            f"{at}inputs are on {inputs.device} but {name}'s parameters on "
            f"{parameter.device}; move the task with .to({parameter.device})"
        )


ELEMENTWISE_LOSSES: tuple[Callable[..., Tensor], ...] = (
    nn.functional.mse_loss,
    nn.functional.l1_loss,
    nn.functional.smooth_l1_loss,
    nn.functional.huber_loss,
)
"""Regression losses that broadcast outputs against targets of another shape (torch only
warns): :func:`shape_checked` refuses that instead."""


class ShapeCheckedLoss:
    """``loss_fn`` that refuses outputs and targets of different shapes (see
    :func:`shape_checked`); equal to, and hashed as, the loss it wraps."""

    def __init__(self, loss_fn: Callable[..., Tensor]) -> None:
        self.loss_fn = loss_fn
        self.__name__ = getattr(loss_fn, "__name__", type(loss_fn).__name__)

    def __call__(self, outputs: Tensor, targets: Tensor, *args: object, **kwargs: object) -> Tensor:
        if (
            isinstance(outputs, Tensor)
            and isinstance(targets, Tensor)
            and outputs.shape != targets.shape
        ):
            raise ValueError(
                f"loss_fn {self.__name__}: the model's outputs have shape "
                f"{tuple(outputs.shape)} but the targets (labels) {tuple(targets.shape)}; "
                "torch would broadcast them against each other and compute a wrong loss. "
                f"Give the targets the outputs' shape (e.g. labels.reshape(-1, "
                f"{', '.join(map(str, outputs.shape[1:])) or 1}) for every set of the task) "
                "or make the model return the targets' shape"
            )
        return self.loss_fn(outputs, targets, *args, **kwargs)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ShapeCheckedLoss):
            other = other.loss_fn
        return bool(self.loss_fn == other)

    def __hash__(self) -> int:
        return hash(self.loss_fn)

    def __repr__(self) -> str:
        return f"shape_checked({self.loss_fn!r})"


def shape_checked(loss_fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``loss_fn``, refusing outputs and targets of different shapes where it is one of
    torch's element-wise regression losses (:data:`ELEMENTWISE_LOSSES`, or their modules):
    a shape comparison where the outputs are computed anyway, no extra pass or host read.

    Example:
        >>> loss = shape_checked(nn.functional.mse_loss)
        >>> loss(torch.zeros(4, 1), torch.zeros(4))
        Traceback (most recent call last):
        ...
        ValueError: loss_fn mse_loss: the model's outputs have shape (4, 1) but the targets ...
    """
    if isinstance(loss_fn, ShapeCheckedLoss):
        return loss_fn
    elementwise = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)
    if loss_fn in ELEMENTWISE_LOSSES or isinstance(loss_fn, elementwise):
        return ShapeCheckedLoss(loss_fn)
    return loss_fn


def check_task(
    support_inputs: Tensor,
    support_labels: Tensor,
    query_inputs: Tensor,
    query_labels: Tensor,
    ways: int | None = None,
    classification: bool = True,
) -> int:
    """Validate one few-shot task and return its number of ways (0 for regression).

    ``ways`` defaults to the number of distinct support labels; every label (support and
    query) must lie in ``[0, ways)``. Reads values on the host unless
    :func:`value_checks` are off.
    """
    task = check_task_metadata(
        (support_inputs, support_labels, query_inputs, query_labels), classification
    )
    check_finite("support_inputs", task.support_inputs)
    check_finite("query_inputs", task.query_inputs)
    if not classification:
        check_finite("support_labels", task.support_labels)
        check_finite("query_labels", task.query_labels)
        return 0
    if ways is None:
        if not value_checks_enabled():
            return 0
        ways = int(torch.unique(task.support_labels).numel())
    check_labels("support_labels", task.support_labels, ways)
    check_labels("query_labels", task.query_labels, ways)
    return ways


def check_meta_batch(
    tasks: Sequence[Task],
    classification: bool = True,
    data_range: tuple[float, float] | None = None,
    *,
    shots: int | None = None,
    names: Sequence[str] | None = None,
) -> None:
    """The value checks of :func:`check_task` (and inputs inside ``data_range``; with
    ``shots``, that many support samples of every class) for every task, with one host read
    for the whole meta-batch; on a failure, the failing task's own check names the problem,
    and the task (``names[i]``, default ``"task i of the meta-batch"``). Does nothing while
    :func:`value_checks` are off.

    Example:
        >>> task = Task(torch.rand(4, 2), torch.tensor([0, 1, 1, 1]), torch.rand(2, 2),
        ...             torch.tensor([0, 1]))
        >>> check_meta_batch([task], shots=2, names=["tasks[7]"])
        Traceback (most recent call last):
        ...
        ValueError: tasks[7]: 1, 3 support samples per class, not 2 each: ...
    """
    if not value_checks_enabled() or not tasks:
        return
    layouts = {tuple((t.shape, t.dtype, t.device) for t in task) for task in tasks}
    if len(layouts) == 1:  # one set of checks for the stacked meta-batch
        stacked = [torch.stack(list(field)) for field in zip(*tasks, strict=True)]
        flags = _task_flags(Task(*stacked), classification, data_range, shots)
    else:
        flags = torch.cat(
            [
                _task_flags(Task(*(t[None] for t in task)), classification, data_range, shots)
                for task in tasks
            ]
        )
    if bool(flags.all()):  # the one host read
        return
    for index, (task, ok) in enumerate(zip(tasks, flags.tolist(), strict=True)):
        if not ok:
            where = f"task {index} of the meta-batch" if names is None else names[index]
            try:
                check_task(*task, classification=classification)
                if data_range is not None:
                    _check_range(task, data_range)
                if shots is not None:
                    _check_shots(task.support_labels, shots)
            except (TypeError, ValueError) as error:
                raise type(error)(f"{where}: {error}") from None
            raise ValueError(f"{where} failed a value check")


def _task_flags(
    tasks: Task,
    classification: bool,
    data_range: tuple[float, float] | None,
    shots: int | None = None,
) -> Tensor:
    """``[T]`` booleans for a stack of ``T`` tasks (every tensor with a leading task
    dimension), true for a good task (computed on their device, not read)."""
    inputs, support = (tasks.support_inputs, tasks.query_inputs), tasks.support_labels
    flags = (
        []
        if shots is None
        else [((support[:, :, None] == support[:, None, :]).sum(2) == shots).all(1)]
    )
    flags += [torch.isfinite(x.flatten(1)).all(1) for x in inputs if x.is_floating_point()]
    if data_range is not None:
        lower, upper = data_range
        slack = 1e-4 * (upper - lower)
        for x in inputs:
            low, high = x.flatten(1).aminmax(dim=1)
            flags += [(low >= lower - slack) & (high <= upper + slack)]
    if not classification:
        labels = (tasks.support_labels, tasks.query_labels)
        flags += [torch.isfinite(y.flatten(1)).all(1) for y in labels if y.is_floating_point()]
        return torch.stack(flags).all(0)
    ordered = support.sort(dim=1).values  # ways = number of distinct support labels
    ways = 1 + (ordered[:, 1:] != ordered[:, :-1]).sum(1)
    for classes in (tasks.support_labels, tasks.query_labels):
        low, high = classes.flatten(1).aminmax(dim=1)
        flags += [(low >= 0) & (high < ways)]
    return torch.stack(flags).all(0)


def _check_shots(support_labels: Tensor, shots: int) -> None:
    counts = torch.bincount(support_labels.long().cpu()).tolist()
    if any(count != shots for count in counts):
        raise ValueError(
            f"{', '.join(map(str, counts))} support samples per class, not {shots} each: "
            "every task must have the same number of shots for every class (a balanced "
            "N-way K-shot support set); evaluate each setting separately"
        )


def _check_range(task: Task, data_range: tuple[float, float]) -> None:
    lower, upper = data_range
    slack = 1e-4 * (upper - lower)
    for name, inputs in (("support", task.support_inputs), ("query", task.query_inputs)):
        low, high = (float(v) for v in torch.stack([inputs.min(), inputs.max()]).tolist())
        if low < lower - slack or high > upper + slack:
            raise ValueError(
                f"{name}_inputs lie in [{low:.4g}, {high:.4g}], outside the attack's "
                f"data_range={data_range}; scale the images (0-255 images: divide by 255) or "
                "pass the attack data_range= in the inputs' units"
            )
