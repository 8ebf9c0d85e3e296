"""torchmeta interoperability: its batch format, and an opt-in shim for torchmeta 1.8.0.

torchmeta's ``BatchMetaDataLoader`` yields ``{"train": (inputs, targets), "test": (inputs,
targets)}`` with inputs ``(B, N*K, C, H, W)`` and targets ``(B, N*K)``, ``B`` tasks per batch.
:func:`tasks_from_batch` turns such a batch into ``B`` :class:`~l2l_adversarial.task.Task`
objects, which every algorithm here consumes; :func:`batch_from_tasks` stacks them back.
These two need neither torchmeta nor the shim.

torchmeta 1.8.0 (its last release) pins ``torch<1.10`` and fails to import on current
torchvision. :func:`enable_torchmeta` makes it importable; nothing is patched unless it is
called. torchmeta ``MetaModule`` models need no shim: the algorithms evaluate every model with
``torch.func.functional_call``, which swaps a ``MetaModule``'s parameters like any module's.

Example:
    >>> from l2l_adversarial.torchmeta_compat import enable_torchmeta, tasks_from_batch
    >>> torchmeta = enable_torchmeta()       # before any ``import torchmeta``
    >>> for batch in loader:                 # a torchmeta BatchMetaDataLoader  # doctest: +SKIP
    ...     optimizer.zero_grad()
    ...     tasks = tasks_from_batch(batch, device="cuda")
    ...     for task in tasks:
    ...         (adml.meta_loss(*task) / len(tasks)).backward()
    ...     optimizer.step()
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any, NoReturn, Protocol

import torch
from torch import Tensor

from l2l_adversarial.seeding import checked_seed
from l2l_adversarial.task import Task
from l2l_adversarial.transforms import AdversarialTaskTransform, checked_transform, derive_seed

__all__ = [
    "SPLIT_NAMES",
    "AdversarialBatches",
    "MetaLossLearner",
    "batch_from_tasks",
    "enable_torchmeta",
    "meta_loss_of_batch",
    "tasks_from_batch",
]

SPLIT_NAMES = (("train", "test"), ("support", "query"))
"""Accepted (support, query) key pairs: torchmeta's ClassSplitter names its splits "train" and
"test" (``num_train_per_class``) or "support" and "query" (``num_support_per_class``)."""

INSTALL_HINT = (
    "install it with `bash scripts/install_torchmeta.sh`, i.e. "
    "`pip install h5py ordered-set && pip install --no-deps torchmeta==1.8.0`"
)

# Private torchvision helpers that torchmeta.datasets.utils imports and later torchvision
# releases removed; torchmeta only uses them in its own Google-Drive downloader.
REMOVED_TORCHVISION_HELPERS = ("_get_confirm_token", "_save_response_content")
DOWNLOADER = "download_file_from_google_drive"


class MetaLossLearner(Protocol):
    """Anything with the algorithms' per-task ``meta_loss`` (ADML, MAMLAD, AdversarialQuerying)."""

    def meta_loss(self, *task: Tensor, steps: int | None = None) -> Tensor: ...


def _split_names(batch: Mapping[str, Any]) -> tuple[str, str]:
    for support, query in SPLIT_NAMES:
        if support in batch and query in batch:
            return support, query
    accepted = " or ".join(f"{s!r} and {q!r}" for s, q in SPLIT_NAMES)
    raise ValueError(
        f"batch has keys {sorted(map(str, batch))}; expected {accepted}: pass the batch of a "
        "torchmeta BatchMetaDataLoader over a dataset with a ClassSplitter dataset_transform"
    )


def _split(batch: Mapping[str, Any], name: str) -> tuple[Tensor, Tensor]:
    value = batch[name]
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(
            f'batch["{name}"] must be a pair (inputs, targets), got {type(value).__name__}'
            + (f" of length {len(value)}" if isinstance(value, Sequence) else "")
        )
    inputs, targets = value
    for role, tensor in (("inputs", inputs), ("targets", targets)):
        if not isinstance(tensor, Tensor):
            raise TypeError(
                f'batch["{name}"] {role} must be a torch.Tensor, got {type(tensor).__name__}; '
                "use a torchmeta dataset whose transform ends in ToTensor()"
            )
    if inputs.dim() < 2 or targets.dim() < 2 or inputs.shape[:2] != targets.shape[:2]:
        raise ValueError(
            f'batch["{name}"] has inputs of shape {tuple(inputs.shape)} and targets of shape '
            f"{tuple(targets.shape)}; expected inputs (tasks, samples, ...) and targets "
            "(tasks, samples, ...) with the same leading two sizes"
        )
    return inputs, targets


def tasks_from_batch(
    batch: Mapping[str, Sequence[Tensor]], *, device: torch.device | str | None = None
) -> list[Task]:
    """Split a torchmeta batch into one :class:`Task` per task (views, no copies).

    Args:
        batch: ``{"train": (inputs, targets), "test": (inputs, targets)}`` ("support"/"query"
            keys work too) with inputs ``(B, N, ...)`` and targets ``(B, N, ...)``: class
            indices ``(B, N)`` (torchmeta's ``Categorical``) or regression targets such as
            ``Sinusoid``'s float ``(B, N, 1)``; the learners check class indices where their
            loss is a classification loss.
        device: move the batch there first (``None``: leave it where it is).

    Example:
        >>> batch = {"train": (torch.rand(2, 5, 3, 8, 8), torch.arange(5).repeat(2, 1)),
        ...          "test": (torch.rand(2, 10, 3, 8, 8), torch.arange(5).repeat(2, 2))}
        >>> [task.query_inputs.shape for task in tasks_from_batch(batch)]
        [torch.Size([10, 3, 8, 8]), torch.Size([10, 3, 8, 8])]
    """
    if not isinstance(batch, Mapping):
        raise TypeError(
            'batch must be a dict {"train": (inputs, targets), "test": (inputs, targets)}, '
            f"as torchmeta's BatchMetaDataLoader yields; got {type(batch).__name__}"
        )
    support, query = _split_names(batch)
    support_inputs, support_labels = _split(batch, support)
    query_inputs, query_labels = _split(batch, query)
    if support_inputs.shape[0] != query_inputs.shape[0]:
        raise ValueError(
            f'batch["{support}"] holds {support_inputs.shape[0]} tasks but batch["{query}"] '
            f"holds {query_inputs.shape[0]}; both splits must come from the same batch"
        )
    if support_inputs.shape[2:] != query_inputs.shape[2:]:
        raise ValueError(
            f'batch["{support}"] samples have shape {tuple(support_inputs.shape[2:])} but '
            f'batch["{query}"] samples {tuple(query_inputs.shape[2:])}; both splits must use '
            "the same transform"
        )
    if support_inputs.shape[0] == 0:
        raise ValueError("batch holds no tasks (leading size 0); a meta-batch needs at least one")
    fields = [support_inputs, support_labels, query_inputs, query_labels]
    if device is not None:
        fields = [tensor.to(device) for tensor in fields]
    return [Task(*task) for task in zip(*(tensor.unbind(0) for tensor in fields), strict=True)]


def _as_task(index: int, task: object) -> Task:
    if not isinstance(task, Sequence) or len(task) != len(Task._fields):
        raise TypeError(
            f"task {index} must be a Task ({', '.join(Task._fields)}), got {type(task).__name__}"
        )
    return Task(*task)


def batch_from_tasks(
    tasks: Iterable[Task], *, split_names: tuple[str, str] = ("train", "test")
) -> dict[str, tuple[Tensor, Tensor]]:
    """Stack equal-sized tasks into a torchmeta batch: the inverse of :func:`tasks_from_batch`.

    Example:
        >>> task = Task(torch.rand(5, 4), torch.arange(5), torch.rand(10, 4), torch.arange(10) % 5)
        >>> batch = batch_from_tasks([task, task])
        >>> batch["train"][0].shape, batch["test"][1].shape
        (torch.Size([2, 5, 4]), torch.Size([2, 10]))
    """
    if (
        not isinstance(split_names, tuple)
        or len(split_names) != 2
        or not all(isinstance(name, str) for name in split_names)
        or split_names[0] == split_names[1]
    ):
        raise ValueError(
            f"split_names must be two distinct strings such as ('train', 'test'), got {split_names!r}"
        )
    tasks = [_as_task(index, task) for index, task in enumerate(tasks)]
    if not tasks:
        raise ValueError("tasks is empty: a batch needs at least one task")
    for index, task in enumerate(tasks):
        for field, tensor, reference in zip(Task._fields, task, tasks[0], strict=True):
            if not isinstance(tensor, Tensor):
                raise TypeError(
                    f"task {index} {field} must be a torch.Tensor, got {type(tensor).__name__}"
                )
            if tensor.shape != reference.shape:
                raise ValueError(
                    f"task {index} has {field} of shape {tuple(tensor.shape)} but task 0 has "
                    f"{tuple(reference.shape)}: a batch stacks tasks of equal ways and shots"
                )
    support_inputs, support_labels, query_inputs, query_labels = (
        torch.stack(field) for field in zip(*tasks, strict=True)
    )
    support, query = split_names
    return {support: (support_inputs, support_labels), query: (query_inputs, query_labels)}


def meta_loss_of_batch(
    learner: MetaLossLearner, batch: Mapping[str, Sequence[Tensor]], steps: int | None = None
) -> Tensor:
    """Mean of ``learner.meta_loss(*task)`` over the tasks of a torchmeta batch.

    Keeps every task's graph until ``backward()``; to save memory on large meta-batches call
    ``backward()`` per task instead (see the module example).

    Example:
        >>> from l2l_adversarial import ADML
        >>> adml = ADML(torch.nn.Linear(4, 5), lr=0.1)
        >>> optimizer = torch.optim.SGD(adml.parameters(), lr=0.01)
        >>> task = Task(torch.rand(5, 4), torch.arange(5), torch.rand(10, 4), torch.arange(10) % 5)
        >>> batch = batch_from_tasks([task, task])
        >>> loss = meta_loss_of_batch(adml, batch)
        >>> loss.backward(); optimizer.step()
    """
    losses = [learner.meta_loss(*task, steps=steps) for task in tasks_from_batch(batch)]
    return torch.stack(losses).mean()


class AdversarialBatches:
    """A torchmeta ``BatchMetaDataLoader`` whose batches are a meta-test scenario.

    Iterating yields the loader's batch dicts (``{"train": (inputs, targets), "test": (inputs,
    targets)}``, other keys kept) with ``transform``'s fractions of every task's support
    ("train") and query ("test") samples perturbed; clean samples are bit-identical and targets
    untouched, so a torchmeta loop runs unchanged. :meth:`perturbed_batches` also yields the
    masks ``{"train": (B, N) bool, "test": (B, M) bool}`` of perturbed samples. With a
    ``seed``, task ``b`` of batch ``n`` is transformed with ``seed=derive_seed(seed, n, b)``.

    Example:
        >>> from l2l_adversarial import FGSM
        >>> from l2l_adversarial.transforms import AdversarialTaskTransform
        >>> batch = {"train": (torch.rand(2, 4, 3), torch.arange(2).repeat(2, 2)),
        ...          "test": (torch.rand(2, 6, 3), torch.arange(2).repeat(2, 3))}
        >>> to_clean_adversarial = AdversarialTaskTransform(
        ...     FGSM(2 / 255), torch.nn.Linear(3, 2), support_fraction=0.0, query_fraction=1.0)
        >>> for batch_out, masks in AdversarialBatches([batch], to_clean_adversarial).perturbed_batches():
        ...     print(torch.equal(batch_out["train"][0], batch["train"][0]), masks["test"].all().item())
        True True
    """

    def __init__(
        self, loader: Iterable[Any], transform: AdversarialTaskTransform, *, seed: int | None = None
    ) -> None:
        self.loader = loader
        self.transform = checked_transform(transform)
        self.seed = checked_seed(seed)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch, _ in self.perturbed_batches():
            yield batch

    def perturbed_batches(self) -> Iterator[tuple[dict[str, Any], dict[str, Tensor]]]:
        """Yield ``(batch, masks)``: the perturbed batch and its masks of perturbed samples."""
        for index, batch in enumerate(self.loader):
            tasks = tasks_from_batch(batch)
            support, query = _split_names(batch)
            perturbed = [
                self.transform(
                    task, seed=None if self.seed is None else derive_seed(self.seed, index, b)
                )
                for b, task in enumerate(tasks)
            ]
            out = dict(batch)
            out[support] = (
                torch.stack([p.task.support_inputs for p in perturbed]),
                batch[support][1],
            )
            out[query] = (torch.stack([p.task.query_inputs for p in perturbed]), batch[query][1])
            masks = {
                support: torch.stack([p.support_mask for p in perturbed]),
                query: torch.stack([p.query_mask for p in perturbed]),
            }
            yield out, masks


def _removed_torchvision_helper(name: str) -> Callable[..., NoReturn]:
    def removed(*args: object, **kwargs: object) -> NoReturn:
        raise RuntimeError(
            f"torchvision.datasets.utils.{name} no longer exists; enable_torchmeta() routes "
            "torchmeta's downloads through torchvision.datasets.utils."
            "download_file_from_google_drive instead"
        )

    return removed


def _subset_task_getitems(self: Any, indices: Sequence[int]) -> list[Any]:
    return [self[index] for index in indices]


def enable_torchmeta() -> ModuleType:
    """Import torchmeta 1.8.0 on current torch/torchvision and return the module.

    Call it before any ``import torchmeta``; calling it again is harmless. It patches only
    what is broken, and only on versions that need it:

    * ``torchmeta.datasets.utils`` imports ``_get_confirm_token`` and ``_save_response_content``
      from ``torchvision.datasets.utils``, which current torchvision lacks. Stand-ins are added for
      the duration of the import and removed again, so torchvision is left as it was; torchmeta's
      Google-Drive downloader (the only user, itself broken: it lacks an import of
      ``check_integrity``) is replaced in every torchmeta module by torchvision's current
      ``download_file_from_google_drive``, which has the same signature.
    * ``SubsetTask`` (the split tasks that ``ClassSplitter`` returns) subclasses
      ``torch.utils.data.Subset`` and overrides ``__getitem__``; current torch refuses to build
      such a subclass without ``__getitems__``. It gets one that calls ``__getitem__``.

    Raises ``ImportError`` naming the install command when torchmeta or its dependencies
    (``h5py``, ``ordered-set``) are missing.

    Limits: DataLoader workers started with "spawn" or "forkserver" re-import torchmeta, so call
    this at the top level of the training script (not under ``if __name__ == "__main__":``).
    Not patched: ``np.int``/``np.float`` in the TCGA and Bach datasets (NumPy >= 1.24 removed
    them); torchmeta's ``DataParallel`` is untested.

    Example:
        >>> torchmeta = enable_torchmeta()
        >>> from torchmeta.utils.data import BatchMetaDataLoader
    """
    try:
        version = importlib.metadata.version("torchmeta")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"torchmeta is not installed; {INSTALL_HINT}") from None
    import torchvision.datasets.utils as torchvision_utils

    missing = [name for name in REMOVED_TORCHVISION_HELPERS if not hasattr(torchvision_utils, name)]
    for name in missing:
        setattr(torchvision_utils, name, _removed_torchvision_helper(name))
    try:
        torchmeta = importlib.import_module("torchmeta")
    except ModuleNotFoundError as error:
        raise ImportError(
            f"torchmeta {version} needs the missing module {error.name!r}; {INSTALL_HINT}"
        ) from error
    finally:
        for name in missing:
            delattr(torchvision_utils, name)
    if missing:
        own_downloader = getattr(torchmeta.datasets.utils, DOWNLOADER)
        for module_name, module in list(sys.modules.items()):
            if (
                module_name.startswith("torchmeta.")
                and getattr(module, DOWNLOADER, None) is own_downloader
            ):
                setattr(module, DOWNLOADER, getattr(torchvision_utils, DOWNLOADER))
    subset_task = torchmeta.utils.data.task.SubsetTask
    if hasattr(torch.utils.data.Subset, "__getitems__") and "__getitems__" not in vars(subset_task):
        subset_task.__getitems__ = _subset_task_getitems
    return torchmeta
