"""Adversarial meta-test scenarios as task transforms (paper Sec. 4.2).

A sampled :class:`~l2l_adversarial.task.Task` becomes one of the paper's scenarios by
perturbing a fraction of every class's support and/or query samples with an attack against a
given model: fraction 0 is "Clean", 0.4 is "40%" (2 of 5 shots per class) and 1 is
"Adversarial". The chosen samples are the first ``round(fraction * count)`` of each class.

* The whole set is attacked and only the chosen rows are kept, so a sample's perturbation does
  not depend on the fraction: the "40%" samples are exactly the corresponding "Adversarial"
  ones (this matters for models whose output for one sample depends on the batch, such as
  MAML's transductive BatchNorm).
* Inputs are never modified: the result is a new tensor whose clean rows are bit-identical to
  the input's (the input itself when nothing is perturbed).
* Deterministic given a seed: attacks with a random start (``FFGSM``, ``PGD``) run on a copy
  whose ``torch.Generator`` is seeded from the seed; the attack passed in is not touched.

Example:
    >>> import torch
    >>> from l2l_adversarial import FGSM, Task
    >>> from l2l_adversarial.transforms import AdversarialTaskTransform
    >>> model = torch.nn.Linear(4, 2)
    >>> task = Task(torch.rand(10, 4), torch.arange(2).repeat(5),
    ...             torch.rand(6, 4), torch.arange(2).repeat(3))
    >>> to_40_clean = AdversarialTaskTransform(FGSM(2 / 255), model, 0.4, 0.0)
    >>> perturbed = to_40_clean(task)
    >>> int(perturbed.support_mask.sum()), int(perturbed.query_mask.sum())
    (4, 0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from l2l_adversarial.attacks import Attack
from l2l_adversarial.functional import FunctionalModel, stateless
from l2l_adversarial.seeding import checked_seed, derive_seed
from l2l_adversarial.task import Task, per_class_prefix
from l2l_adversarial.validation import check_labels, check_task

Model = Callable[[Tensor], Tensor]

SUPPORT_STREAM = 0
"""Key of the support set's attack seed: ``derive_seed(task_seed, SUPPORT_STREAM)``."""
QUERY_STREAM = 1
"""Key of the query set's attack seed: ``derive_seed(task_seed, QUERY_STREAM, step)``."""

__all__ = [
    "QUERY_STREAM",
    "SUPPORT_STREAM",
    "AdversarialTaskSampler",
    "AdversarialTaskTransform",
    "AdversarialTaskset",
    "PerturbedSample",
    "PerturbedTask",
    "TaskSource",
    "adversarial_mask",
    "alternate_split",
    "derive_seed",
    "keep_adversarial_rows",
    "perturb",
    "seeded",
]


def seeded(attack: Attack, seed: int | None) -> Attack:
    """``attack``, with its random numbers drawn from ``torch.Generator().manual_seed(seed)``.

    Attacks that draw none (``FGSM``) and ``seed=None`` return ``attack`` itself; otherwise a
    shallow copy is returned and ``attack`` is left untouched
    (:meth:`~l2l_adversarial.attacks.Attack.drawing_from`).
    """
    if seed is None:
        return attack
    return attack.drawing_from(torch.Generator().manual_seed(seed))


def adversarial_mask(labels: Tensor, fraction: float) -> Tensor:
    """Boolean mask of the samples to perturb: the first ``round(fraction * count)`` per class.

    Example:
        >>> adversarial_mask(torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1]), 0.4).tolist()
        [True, True, False, False, False, True, True, False, False, False]
    """
    _check_fraction("fraction", fraction)
    check_labels("labels", labels, int(labels.max()) + 1 if labels.numel() else 1)
    return per_class_prefix(labels, float(fraction))


def perturb(
    attack: Attack,
    model: Model,
    inputs: Tensor,
    labels: Tensor,
    fraction: float = 1.0,
    *,
    seed: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Perturb ``fraction`` of every class's samples with ``attack`` against ``model``.

    The whole set is attacked and the rows selected by :func:`adversarial_mask` are kept, so
    the perturbation of a sample is the same for every fraction.

    Returns:
        ``(inputs_out, mask)``: a new tensor (``inputs`` itself when the mask is empty) whose
        unselected rows are bit-identical to ``inputs``, and the boolean mask of perturbed rows.

    Example:
        >>> from l2l_adversarial import FGSM
        >>> x, y = torch.rand(4, 3), torch.tensor([0, 0, 1, 1])
        >>> x_out, mask = perturb(FGSM(0.1), torch.nn.Linear(3, 2), x, y, fraction=0.5)
        >>> mask.tolist(), torch.equal(x_out[~mask], x[~mask])
        ([True, False, True, False], True)
    """
    _check_attack(attack)
    if labels.dim() != 1 or inputs.dim() < 1 or inputs.shape[0] != labels.shape[0]:
        raise ValueError(
            f"inputs has shape {tuple(inputs.shape)} and labels shape {tuple(labels.shape)}: "
            "expected (N, ...) inputs with N labels"
        )
    mask = adversarial_mask(labels, fraction).to(labels.device)
    if not bool(mask.any()):
        return inputs, mask
    adversarial = seeded(attack, seed)(model, inputs, labels)
    return keep_adversarial_rows(labels, fraction, adversarial, inputs), mask


def keep_adversarial_rows(
    labels: Tensor, fraction: float, adversarial: Tensor, inputs: Tensor
) -> Tensor:
    """``adversarial`` rows for the first ``round(fraction * count)`` samples of every class
    (:func:`~l2l_adversarial.task.per_class_prefix`), the clean ``inputs`` (bit for bit)
    elsewhere; leading dimensions of ``labels`` are a stack of tasks. No value is read.

    Example:
        >>> x, y = torch.zeros(4, 2), torch.tensor([0, 0, 1, 1])
        >>> keep_adversarial_rows(y, 0.5, torch.ones(4, 2), x)[:, 0].tolist()
        [1.0, 0.0, 1.0, 0.0]
    """
    mask = per_class_prefix(labels, fraction)
    rows = mask.view(*mask.shape, *([1] * (inputs.dim() - mask.dim())))
    return torch.where(rows, adversarial.to(inputs.dtype), inputs.detach())


@dataclass(frozen=True)
class PerturbedTask:
    """A task after :class:`AdversarialTaskTransform` and the record of what was perturbed.

    ``task`` unpacks into every ``meta_loss``; ``support_mask[i]`` / ``query_mask[i]`` say
    whether sample ``i`` of that set is adversarial.
    """

    task: Task
    support_mask: Tensor
    query_mask: Tensor


class AdversarialTaskTransform:
    """Turn a task into a meta-test scenario: perturb fractions of its support and query sets.

    Args:
        attack: an :class:`~l2l_adversarial.attacks.Attack` (FGSM, FFGSM, PGD, ...).
        model: what the attack differentiates: a callable returning logits or an
            ``nn.Module`` (read at its current parameters on every call), or a
            :class:`~l2l_adversarial.functional.FunctionalModel` evaluated at ``params``. A
            gradient-based learner (``ADML``, ``MAML``, ...) is its ``FunctionalModel``:
            its network on raw inputs, ``features`` included.
        support_fraction: fraction of every class's support samples to perturb, in [0, 1].
        query_fraction: fraction of every class's query samples to perturb, in [0, 1].
        params: parameters to attack the model at (``FunctionalModel`` or ``nn.Module``);
            default: the model's own (live) parameters.

    Call it as ``transform(task, seed=None) -> PerturbedTask``; with a seed, attacks with a
    random start draw it from ``derive_seed(seed, SUPPORT_STREAM)`` (support) and
    ``derive_seed(seed, QUERY_STREAM, 0)`` (query), as
    :func:`~l2l_adversarial.evaluation.evaluate` does (``protocol="paper"``) for task
    ``index`` with ``seed=derive_seed(evaluation_seed, index)``.

    Example:
        >>> from l2l_adversarial import FGSM
        >>> model = torch.nn.Linear(4, 2)
        >>> task = Task(torch.rand(6, 4), torch.arange(2).repeat(3),
        ...             torch.rand(4, 4), torch.arange(2).repeat(2))
        >>> adversarial_adversarial = AdversarialTaskTransform(FGSM(2 / 255), model, 1.0, 1.0)
        >>> perturbed = adversarial_adversarial(task, seed=0)
        >>> support_x, support_y, query_x, query_y = perturbed.task
        >>> bool(perturbed.support_mask.all() and perturbed.query_mask.all())
        True
    """

    def __init__(
        self,
        attack: Attack,
        model: Model | FunctionalModel,
        support_fraction: float = 1.0,
        query_fraction: float = 1.0,
        *,
        params: Mapping[str, Tensor] | None = None,
    ) -> None:
        _check_attack(attack)
        functional = getattr(model, "functional", None)
        if isinstance(model, nn.Module) and isinstance(functional, FunctionalModel):
            model = functional  # a learner: its network, features (ANIL) included
        if params is not None and not isinstance(model, (FunctionalModel, nn.Module)):
            raise TypeError(
                "params= needs model to be an nn.Module or a FunctionalModel, got "
                f"{type(model).__name__}; pass a callable already bound to its parameters"
            )
        if not isinstance(model, FunctionalModel) and not callable(model):
            raise TypeError(
                "model must be a callable returning logits, an nn.Module or a FunctionalModel, "
                f"got {type(model).__name__}"
            )
        self.attack = attack
        self.model = model
        self.params = None if params is None else dict(params)
        self.support_fraction = _check_fraction("support_fraction", support_fraction)
        self.query_fraction = _check_fraction("query_fraction", query_fraction)

    def __repr__(self) -> str:
        return (
            f"AdversarialTaskTransform({self.attack!r}, support_fraction={self.support_fraction:g}, "
            f"query_fraction={self.query_fraction:g})"
        )

    def target(self) -> Model:
        """The model attacked now: detached parameters, copied buffers."""
        if isinstance(self.model, FunctionalModel):
            return self.model.at(
                self.params if self.params is not None else self.model.parameters()
            )
        return stateless(self.model, self.params)

    def __call__(self, task: Task, seed: int | None = None) -> PerturbedTask:
        if not isinstance(task, tuple) or len(task) != 4:
            raise TypeError(
                "task must be a Task (support_inputs, support_labels, query_inputs, "
                f"query_labels), got {type(task).__name__}"
            )
        support_inputs, support_labels, query_inputs, query_labels = task
        check_task(support_inputs, support_labels, query_inputs, query_labels)
        model = self.target()
        support_seed = None if seed is None else derive_seed(seed, SUPPORT_STREAM)
        query_seed = None if seed is None else derive_seed(seed, QUERY_STREAM, 0)
        support, support_mask = perturb(
            self.attack,
            model,
            support_inputs,
            support_labels,
            self.support_fraction,
            seed=support_seed,
        )
        query, query_mask = perturb(
            self.attack, model, query_inputs, query_labels, self.query_fraction, seed=query_seed
        )
        return PerturbedTask(
            Task(support, support_labels, query, query_labels), support_mask, query_mask
        )


class TaskSource(Protocol):
    """Anything that samples tasks, like a learn2learn ``TaskDataset`` split into a ``Task``."""

    def sample(self) -> Task: ...


class AdversarialTaskSampler:
    """Wrap a task source so that every sampled task goes through ``transform``.

    ``sample()`` returns a :class:`~l2l_adversarial.task.Task` (a drop-in for the wrapped
    source in a learn2learn loop); ``sample_perturbed()`` also returns the masks. With a
    ``seed``, the n-th sampled task is transformed with ``seed=derive_seed(seed, n)``.

    Example:
        >>> from l2l_adversarial import PGD
        >>> class RandomTasks:  # stands in for a learn2learn TaskDataset split into a Task
        ...     def sample(self) -> Task:
        ...         return Task(torch.rand(6, 4), torch.arange(2).repeat(3),
        ...                     torch.rand(4, 4), torch.arange(2).repeat(2))
        >>> transform = AdversarialTaskTransform(PGD(2 / 255), torch.nn.Linear(4, 2), 1.0, 0.0)
        >>> adversarial_tasks = AdversarialTaskSampler(RandomTasks(), transform, seed=0)
        >>> support_x, support_y, query_x, query_y = adversarial_tasks.sample()
    """

    def __init__(
        self,
        tasks: TaskSource,
        transform: AdversarialTaskTransform | Callable[..., PerturbedTask],
        seed: int | None = None,
    ) -> None:
        if not callable(getattr(tasks, "sample", None)):
            raise TypeError(
                f"tasks must have a .sample() method returning a Task, got {type(tasks).__name__}"
            )
        self.tasks = tasks
        self.transform = transform
        self.seed = checked_seed(seed)
        self.sampled = 0

    def sample_perturbed(self) -> PerturbedTask:
        """The next task of the source, perturbed, with the masks of perturbed samples."""
        task = self.tasks.sample()
        if not isinstance(task, tuple) or len(task) != 4:
            raise TypeError(
                f"{type(self.tasks).__name__}.sample() must return a Task (support_inputs, "
                "support_labels, query_inputs, query_labels); learn2learn's TaskDataset "
                "returns [data, labels]: split it into support and query first"
            )
        seed = None if self.seed is None else derive_seed(self.seed, self.sampled)
        self.sampled += 1
        return self.transform(Task(*task), seed=seed)

    def sample(self) -> Task:
        """The next task of the source, perturbed."""
        return self.sample_perturbed().task


def alternate_split(labels: Tensor) -> Tensor:
    """learn2learn's examples' support/query split: even positions are the support set.

    With ``KShots(dataset, 2 * shots)`` a learn2learn task holds each class's samples side by
    side, so the even positions are ``shots`` support samples per class (``fast_adapt`` in
    learn2learn's ``maml_miniimagenet.py``: ``adaptation_indices[np.arange(shots*ways) * 2]``).

    Example:
        >>> alternate_split(torch.tensor([0, 0, 1, 1])).tolist()
        [True, False, True, False]
    """
    mask = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
    mask[::2] = True
    return mask


@dataclass(frozen=True)
class PerturbedSample:
    """A learn2learn task after :class:`AdversarialTaskset`: ``data`` with the scenario applied,
    the unchanged ``labels``, which rows are support samples and which were perturbed."""

    data: Tensor
    labels: Tensor
    support: Tensor
    perturbed: Tensor


class AdversarialTaskset:
    """A learn2learn ``TaskDataset``/``Taskset`` whose sampled tasks are a meta-test scenario.

    ``sample()`` returns ``[data, labels]`` like the wrapped taskset, with ``transform``'s
    fractions of the support and the query rows perturbed (clean rows bit-identical), so a
    learn2learn loop (``fast_adapt(taskset.sample(), ...)``) runs unchanged.
    ``sample_perturbed()`` also returns which rows are support rows and which were perturbed.

    Args:
        taskset: anything whose ``.sample()`` returns ``[data, labels]``.
        transform: an :class:`AdversarialTaskTransform` (attack, attacked model, fractions).
        support: ``support(labels) -> bool mask`` of the support rows; default
            :func:`alternate_split`, the split of learn2learn's examples.
        seed: task ``n`` sampled through the wrapper is transformed with
            ``seed=derive_seed(seed, n)`` (attacks with a random start); ``None``: unseeded.

    Example:
        >>> import learn2learn as l2l
        >>> from l2l_adversarial import FGSM
        >>> dataset = l2l.data.MetaDataset(torch.utils.data.TensorDataset(
        ...     torch.rand(40, 4), torch.arange(4).repeat_interleave(10)))
        >>> taskset = l2l.data.Taskset(dataset, [
        ...     l2l.data.transforms.NWays(dataset, 2), l2l.data.transforms.KShots(dataset, 4),
        ...     l2l.data.transforms.LoadData(dataset), l2l.data.transforms.RemapLabels(dataset)])
        >>> model = torch.nn.Linear(4, 2)
        >>> adversarial_support = AdversarialTaskset(
        ...     taskset, AdversarialTaskTransform(FGSM(2 / 255), model, 1.0, 0.0), seed=0)
        >>> data, labels = adversarial_support.sample()
        >>> data.shape, adversarial_support.sample_perturbed().perturbed.tolist()
        (torch.Size([8, 4]), [True, False, True, False, True, False, True, False])
    """

    def __init__(
        self,
        taskset: object,
        transform: AdversarialTaskTransform,
        *,
        support: Callable[[Tensor], Tensor] = alternate_split,
        seed: int | None = None,
    ) -> None:
        if not callable(getattr(taskset, "sample", None)):
            raise TypeError(
                "taskset must have a .sample() method returning [data, labels] (a learn2learn "
                f"TaskDataset), got {type(taskset).__name__}"
            )
        if not callable(support):
            raise TypeError(
                f"support must be a callable labels -> bool mask, got {type(support).__name__}"
            )
        self.taskset = taskset
        self.transform = checked_transform(transform)
        self.support = support
        self.seed = checked_seed(seed)
        self.sampled = 0

    def __repr__(self) -> str:
        return f"AdversarialTaskset({type(self.taskset).__name__}, {self.transform!r})"

    def __len__(self) -> int:
        return len(self.taskset)  # type: ignore[arg-type]

    def sample_perturbed(self) -> PerturbedSample:
        """The next task of the taskset, perturbed, with its support and perturbed-row masks."""
        sampled = self.taskset.sample()  # type: ignore[attr-defined]
        if not isinstance(sampled, Sequence) or len(sampled) != 2:
            raise TypeError(
                f"{type(self.taskset).__name__}.sample() must return [data, labels] as "
                "learn2learn's TaskDataset does; for 4-part Tasks use AdversarialTaskSampler"
            )
        data, labels = sampled
        support = self.support(labels)
        if (
            not isinstance(support, Tensor)
            or support.dtype != torch.bool
            or support.shape != labels.shape[:1]
        ):
            raise ValueError(
                f"support(labels) must return a bool mask of shape ({labels.shape[0]},), got "
                f"{support!r:.80}"
            )
        seed = None if self.seed is None else derive_seed(self.seed, self.sampled)
        self.sampled += 1
        task = Task(data[support], labels[support], data[~support], labels[~support])
        perturbed = self.transform(task, seed=seed)
        mask = torch.zeros_like(support)
        mask[support], mask[~support] = perturbed.support_mask, perturbed.query_mask
        if bool(mask.any()):
            data = data.clone()
            data[support] = perturbed.task.support_inputs
            data[~support] = perturbed.task.query_inputs
        return PerturbedSample(data, labels, support, mask)

    def sample(self) -> list[Tensor]:
        """The next task, ``[data, labels]``, with the scenario applied."""
        sampled = self.sample_perturbed()
        return [sampled.data, sampled.labels]


def checked_transform(transform: object) -> AdversarialTaskTransform:
    """``transform`` if it is an :class:`AdversarialTaskTransform`, else a TypeError."""
    if not isinstance(transform, AdversarialTaskTransform):
        raise TypeError(
            "transform must be an AdversarialTaskTransform(attack, model, support_fraction, "
            f"query_fraction), got {type(transform).__name__}"
        )
    return transform


def _check_attack(attack: object) -> None:
    if not isinstance(attack, Attack):
        raise TypeError(
            "attack must be an l2l_adversarial.attacks.Attack (FGSM, FFGSM, PGD, ...), "
            f"got {type(attack).__name__}"
        )


def _check_fraction(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0.0 <= value <= 1.0
    ):
        raise ValueError(
            f"{name} must be a number in [0, 1] (0: clean, 0.4: the paper's 40%, 1: all "
            f"adversarial), got {value!r}"
        )
    return float(value)
