"""Engines that evaluate ADML's meta-objective (Eq. 1) over a whole meta-batch.

* ``"sequential"``: task after task, exactly as :meth:`ADML.task_objective` computes one task.
  This is the reference; :meth:`ADML.meta_step` keeps one task's graph in memory at a time.
* ``"vmap"``: every task of the meta-batch and both branches of Eq. (1) at once, with
  ``torch.func``: line 7 is one ``vmap`` over ``grad`` for the ``2T`` (branch, task) pairs,
  line 11 one vmapped query pass, and lines 6 and 9 one attack call over the meta-batch
  (BatchNorm statistics and losses stay per task and per set; attacks with a random start
  still run task by task, see :func:`batches_attack`). On a GPU this launches each layer's
  kernels once per meta-batch instead of ``2T`` times.
* ``"auto"`` (default): ``"vmap"`` when the parameters are on CUDA and the model allows it
  (:func:`vmap_obstacle`), ``"sequential"`` otherwise: on CPU the vmapped (grouped)
  convolutions are slower than the loop.

All engines give the same meta-gradient to floating-point tolerance. The vmap engine needs
tasks of equal shapes (``"auto"`` falls back to the loop when they differ). Inside it, batch
and layer normalisation run as primitive operations: PyTorch's batching rules for the fused
kernels give wrong second derivatives (pytorch/functorch#534).

Example:
    >>> import torch, l2l_adversarial as l2la
    >>> from l2l_adversarial import engines
    >>> adml = l2la.ADML(l2la.CNN4(ways=3, in_channels=1, hidden=4, image_size=16), lr=0.1)
    >>> tasks = [l2la.Task(torch.rand(3, 1, 16, 16), torch.arange(3),
    ...                    torch.rand(6, 1, 16, 16), torch.arange(3).repeat(2))] * 2
    >>> objective = engines.meta_batch_objective(adml, tasks, engine="vmap")
    >>> objective.total.backward()  # same gradient as engine="sequential"
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.overrides import TorchFunctionMode

from l2l_adversarial.algorithms.adml import ADML, ADMLObjective, AdversarialTask
from l2l_adversarial.attacks import FGSM, PGD, Attack
from l2l_adversarial.functional import Params
from l2l_adversarial.task import Task
from l2l_adversarial.validation import check_choice, check_task

__all__ = [
    "ENGINES",
    "adversarial_tasks",
    "batches_attack",
    "mean_objective",
    "meta_batch_objective",
    "preferred_engine",
    "resolve_engine",
    "vmap_obstacle",
]

ENGINES = ("auto", "sequential", "vmap")

EMPTY_BATCH = "tasks is empty: a meta-batch needs at least one task"


# -- choosing an engine --------------------------------------------------------------------
def preferred_engine(device: torch.device) -> str:
    """The engine ``"auto"`` picks on ``device`` for a model vmap can run.

    Example:
        >>> preferred_engine(torch.device("cuda")), preferred_engine(torch.device("cpu"))
        ('vmap', 'sequential')
    """
    return "vmap" if device.type == "cuda" else "sequential"


def vmap_obstacle(model: nn.Module) -> str | None:
    """Why the vmap engine cannot run ``model`` (in its current train/eval mode), or ``None``.

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


def resolve_engine(adml: ADML, engine: str = "auto") -> str:
    """``"sequential"`` or ``"vmap"``: what ``engine`` means for ``adml``'s model and device.

    Raises ``ValueError`` for an unknown name, or for ``"vmap"`` on a model it cannot run.

    Example:
        >>> resolve_engine(adml, "auto")  # "sequential" on CPU, "vmap" on CUDA
    """
    check_choice("engine", engine, ENGINES)
    if engine == "sequential":
        return engine
    obstacle = vmap_obstacle(adml.functional.module)
    if engine == "auto":
        preferred = preferred_engine(next(iter(adml.meta_parameters().values())).device)
        return "sequential" if obstacle else preferred
    if obstacle:
        raise ValueError(
            f"engine='vmap' cannot run {type(adml.functional.module).__name__}: {obstacle}. "
            "Use engine='sequential' (or 'auto', which falls back to it)."
        )
    return engine


def batches_attack(attack: Attack) -> bool:
    """Whether the vmap engine attacks a whole meta-batch in one call.

    Only for attacks without randomness (FGSM; PGD without random start): an attack with a
    random start runs task by task as the tasks come, so an iterator that seeds the attack's
    generator before yielding each task gets the sequential engine's samples. (With
    ``attack_target="adapted"`` the query sets are attacked after every task is adapted, as
    in :meth:`ADML.meta_step` with two optimizers.)

    Example:
        >>> batches_attack(FGSM(eps=2 / 255)), batches_attack(PGD(eps=2 / 255))
        (True, False)
    """
    return type(attack) is FGSM or (type(attack) is PGD and not attack.random_start)


# -- the engines ---------------------------------------------------------------------------
def adversarial_tasks(
    adml: ADML, tasks: Iterable[Task], engine: str = "auto"
) -> list[AdversarialTask]:
    """Lines 5-6 and 8-9 of Algorithm 1 for every task of a meta-batch.

    Example:
        >>> batch = adversarial_tasks(adml, tasks, engine="vmap")
    """
    if resolve_engine(adml, engine) == "sequential" or not batches_attack(adml.attack):
        return [adml.adversarial_task(*task) for task in tasks]
    checked = _checked(tasks)
    if not _stackable(checked, engine):
        return [adml.adversarial_task(*task) for task in checked]
    with _PrimitiveNormalisation():
        theta = adml.meta_parameters()
        support = (
            _stack(t.support_inputs for t in checked),
            _stack(t.support_labels for t in checked),
        )
        query = (_stack(t.query_inputs for t in checked), _stack(t.query_labels for t in checked))
        query_adversarial: list[Tensor | None] = [None] * len(checked)
        if adml.attack_target == "initial":
            queries, supports = _attack_sets(adml, theta, False, [query, support])
            query_adversarial = list(queries)
        else:  # D'_adv is made against theta'_c, inside the objective
            (supports,) = _attack_sets(adml, theta, False, [support])
    return [
        AdversarialTask(
            support_clean=task.support_inputs,
            support_adversarial=support_adversarial,
            support_labels=task.support_labels,
            query_clean=task.query_inputs,
            query_adversarial=adversarial,
            query_labels=task.query_labels,
        )
        for task, support_adversarial, adversarial in zip(
            checked, supports, query_adversarial, strict=True
        )
    ]


def mean_objective(
    adml: ADML, batch: Iterable[AdversarialTask], steps: int | None = None, engine: str = "auto"
) -> ADMLObjective:
    """Line 7 and the losses of line 11, averaged over the tasks; differentiable in theta.

    Example:
        >>> mean_objective(adml, adversarial_tasks(adml, tasks)).total.backward()
    """
    vmap_engine = resolve_engine(adml, engine) == "vmap"
    steps = adml.resolve_steps(steps)
    batch = list(batch)
    if not batch:
        raise ValueError(EMPTY_BATCH)
    if vmap_engine and _stackable(batch, engine):
        with _PrimitiveNormalisation():
            return _batched_objective(adml, batch, steps)
    return _mean([adml.objective(task, steps) for task in batch])


def meta_batch_objective(
    adml: ADML, tasks: Iterable[Task], steps: int | None = None, engine: str = "auto"
) -> ADMLObjective:
    """Lines 5-11 for a meta-batch: the mean over tasks of :meth:`ADML.task_objective`.

    Example:
        >>> meta_batch_objective(adml, tasks, engine="auto").total.backward()
    """
    steps = adml.resolve_steps(steps)
    if resolve_engine(adml, engine) == "vmap":
        return mean_objective(adml, adversarial_tasks(adml, tasks, engine), steps, engine)
    objectives = [adml.task_objective(task, steps) for task in tasks]
    if not objectives:
        raise ValueError(EMPTY_BATCH)
    return _mean(objectives)


# -- the vmap engine -----------------------------------------------------------------------
def _batched_objective(adml: ADML, batch: Sequence[AdversarialTask], steps: int) -> ADMLObjective:
    """Line 7 for the ``2T`` (branch, task) pairs in one vmap, then line 11 in another.

    Pairs ``0..T-1`` are the adversarial branch (D_adv, alpha1), ``T..2T-1`` the clean one.
    """
    functional, count = adml.functional, len(batch)
    theta = adml.meta_parameters()
    support = torch.cat(
        [_stack(t.support_adversarial for t in batch), _stack(t.support_clean for t in batch)]
    )
    support_labels = _stack(t.support_labels for t in batch).repeat(2, 1)
    like = next(iter(theta.values()))
    step_sizes = torch.tensor(
        [adml.lr] * count + [adml.clean_lr] * count, dtype=like.dtype, device=like.device
    )

    def adapt(params: Params, inputs: Tensor, labels: Tensor, step_size: Tensor) -> Params:
        def support_loss(p: Params) -> Tensor:
            return functional.loss_fn(functional(p, inputs), labels)

        for _ in range(steps):
            gradients = grad(support_loss)(params)
            if adml.first_order:
                gradients = {name: g.detach() for name, g in gradients.items()}
            params = {name: p - step_size * gradients[name] for name, p in params.items()}
        return params

    adapted = vmap(adapt, in_dims=(None, 0, 0, 0))(theta, support, support_labels, step_sizes)
    query_clean = _stack(t.query_clean for t in batch)
    query_labels = _stack(t.query_labels for t in batch)
    given = [t.query_adversarial for t in batch]
    if all(q is None for q in given):  # attack_target="adapted": D'_adv against theta'_c
        clean_branch = {name: p[count:] for name, p in adapted.items()}
        if batches_attack(adml.attack):
            (query_adversarial,) = _attack_sets(
                adml, clean_branch, True, [(query_clean, query_labels)]
            )
        else:  # task by task, in the order meta_step's sequential engine attacks them
            query_adversarial = _stack(
                adml.perturb({n: p[i] for n, p in clean_branch.items()}, x, y)
                for i, (x, y) in enumerate(zip(query_clean, query_labels, strict=True))
            )
    elif any(q is None for q in given):
        raise ValueError(
            "batch mixes tasks with and without query_adversarial; make all of them with "
            "the same attack_target"
        )
    else:
        query_adversarial = _stack(q for q in given if q is not None)
    losses, accuracies = vmap(functional.loss)(
        adapted, torch.cat([query_clean, query_adversarial]), query_labels.repeat(2, 1)
    )
    return ADMLObjective(
        losses[:count].mean(),
        losses[count:].mean(),
        accuracies[:count].mean(),
        accuracies[count:].mean(),
    )


def _attack_sets(
    adml: ADML, params: Params, batched: bool, sets: Sequence[tuple[Tensor, Tensor]]
) -> list[Tensor]:
    """One attack call for some sets of every task: ``sets[j] = (inputs [T, N_j, ...],
    labels [T, N_j])``; returns the adversarial inputs in the same layout.

    The attack sees one flat batch, task by task and, within a task, set by set (the order
    in which the sequential engine attacks them). The model it attacks evaluates every
    (task, set) segment on its own, at that task's parameters when ``batched``; its loss is
    the sum of the segments' losses, so each segment gets the gradient a call of its own
    would give it.
    """
    tasks, sizes = sets[0][0].shape[0], [inputs.shape[1] for inputs, _ in sets]
    detached = {name: p.detach() for name, p in params.items()}
    forward = vmap(adml.functional, in_dims=(0 if batched else None, 0))
    task_losses = vmap(adml.attack.loss_fn)

    def segments(flat: Tensor) -> tuple[Tensor, ...]:
        return flat.unflatten(0, (tasks, -1)).split(sizes, dim=1)

    def model(flat: Tensor) -> Tensor:
        return torch.cat([forward(detached, s) for s in segments(flat)], dim=1).flatten(0, 1)

    def segment_losses(logits: Tensor, labels: Tensor) -> Tensor:
        pairs = zip(segments(logits), segments(labels), strict=True)
        return torch.stack([task_losses(lg, lb).sum() for lg, lb in pairs]).sum()

    attack = copy.copy(adml.attack)
    attack.loss_fn = segment_losses
    inputs = torch.cat([inputs for inputs, _ in sets], dim=1).flatten(0, 1)
    labels = torch.cat([labels for _, labels in sets], dim=1).flatten(0, 1)
    return list(segments(attack(model, inputs, labels)))


class _PrimitiveNormalisation(TorchFunctionMode):
    """While active, batch and layer normalisation are composed from primitive operations.

    Under vmap, PyTorch's batching rules for the fused normalisation kernels give wrong
    second derivatives (pytorch/functorch#534); written with ``var_mean`` and ``rsqrt`` the
    same functions differentiate exactly.
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return _batch_norm(*args, **kwargs)
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        return func(*args, **kwargs)


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


# -- helpers -------------------------------------------------------------------------------
def _stack(tensors: Iterable[Tensor]) -> Tensor:
    return torch.stack(list(tensors))


def _mean(objectives: Sequence[ADMLObjective]) -> ADMLObjective:
    return ADMLObjective(
        *(torch.stack(list(values)).mean() for values in zip(*objectives, strict=True))
    )


def _checked(tasks: Iterable[Any]) -> list[Task]:
    checked = [Task(*task) for task in tasks]
    if not checked:
        raise ValueError(EMPTY_BATCH)
    for task in checked:
        check_task(*task)
    return checked


def _shapes(item: Any) -> tuple[tuple[int, ...] | None, ...]:
    values = (
        item
        if isinstance(item, tuple)
        else [getattr(item, field.name) for field in dataclasses.fields(item)]
    )
    return tuple(None if v is None else tuple(v.shape) for v in values)


def _stackable(items: Sequence[Task] | Sequence[AdversarialTask], engine: str) -> bool:
    """Whether the tasks have equal shapes, as vmap needs; ``engine="vmap"`` insists."""
    shapes = [_shapes(item) for item in items]
    for index, item_shapes in enumerate(shapes):
        if item_shapes != shapes[0]:
            if engine == "auto":
                return False
            raise ValueError(
                f"engine='vmap' cannot run this meta-batch: task {index} has tensor shapes "
                f"{item_shapes} but task 0 has {shapes[0]}; vmap stacks the tasks, so their "
                "shapes must be equal. Use engine='sequential' (or 'auto')."
            )
    return True
