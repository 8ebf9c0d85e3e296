"""N-way K-shot tasks with a separate query set, reproducible from a seed.

Tasks are drawn exactly as learn2learn's ``Taskset`` with the task transforms ``NWays``,
``KShots``, ``LoadData`` and ``RemapLabels`` draws them from Python's global ``random``
seeded from ``(seed, i)`` (the tests compare the two task by task), but with the same calls
on a private ``random.Random``: choosing task ``i`` touches no global generator, is
thread-safe and costs microseconds. The images are then gathered by row index from an
:class:`~l2l_adversarial.data.device.ImageTable` when the dataset's layout is known (one
``index_select`` and one float conversion per task, both sets at once, on the host or, with
``device=``, on the accelerator), or loaded per sample otherwise. A dataset with a
per-sample ``transform`` is loaded per sample with Python's, numpy's and torch's global
generators seeded from ``(seed, i)`` and restored afterwards, as learn2learn would, so
random transforms are reproducible too (that path is not thread-safe: do not sample it from
several threads).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import numpy as np
import torch
from learn2learn.data import MetaDataset
from torch import Tensor
from torch.utils.data import TensorDataset

from l2l_adversarial.data.device import image_table
from l2l_adversarial.errors import UserError
from l2l_adversarial.seeding import derive_seed
from l2l_adversarial.task import Task

__all__ = ["FewShotTasks", "TaskSizeError", "as_meta_dataset", "fixed_tasks"]


class TaskSizeError(UserError, ValueError):
    """The dataset has too few classes, or too few samples per class, for the task size."""


def _dataset_labels(dataset: Any) -> list[int] | None:
    """Every sample's label without loading images, or None if the dataset does not say."""
    targets: Any = (
        dataset.tensors[-1]
        if isinstance(dataset, TensorDataset)
        else getattr(dataset, "targets", None)
    )
    if targets is None:
        return None
    labels = np.asarray(targets)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise TypeError(
            f"dataset labels must be one integer class per sample, got an array of dtype "
            f"{labels.dtype} and shape {labels.shape}"
        )
    return labels.tolist()


def as_meta_dataset(data: Any) -> MetaDataset:
    """Wrap labelled data as a learn2learn ``MetaDataset``.

    ``data`` may be a ``MetaDataset``, any dataset of ``(input tensor, label)`` pairs, or an
    ``(inputs, labels)`` tuple of tensors. Labels are read from ``TensorDataset`` tensors or a
    ``targets`` attribute (as torchvision's and this package's datasets have) without
    loading inputs; otherwise learn2learn reads every sample once.

    Example::

        meta = as_meta_dataset((torch.randn(100, 3, 8, 8), torch.arange(100) % 10))
    """
    if isinstance(data, MetaDataset):
        return data
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        inputs, labels = data
        if labels.dim() != 1 or len(inputs) != len(labels):
            raise ValueError(
                f"(inputs, labels) must hold N inputs and N labels, got shapes "
                f"{tuple(inputs.shape)} and {tuple(labels.shape)}"
            )
        data = TensorDataset(inputs, labels)
    if not (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        raise TypeError(
            "dataset must be a Dataset of (input, label) pairs, a MetaDataset or an (inputs, "
            f"labels) tuple of tensors; got {type(data).__name__}"
        )
    labels_list = _dataset_labels(data)
    if labels_list is None:
        return MetaDataset(data)
    if len(labels_list) != len(data):
        raise ValueError(f"dataset has {len(data)} samples but {len(labels_list)} labels")
    labels_to_indices: dict[int, list[int]] = {}
    for index, label in enumerate(labels_list):
        labels_to_indices.setdefault(label, []).append(index)
    return MetaDataset(data, labels_to_indices=labels_to_indices)


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@contextmanager
def _global_random_state(seed: int) -> Iterator[None]:
    """Seed Python's, numpy's and torch's global CPU generators; restore them on exit."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class _Sampler(Protocol):
    """What task sampling needs of a generator: ``random.Random`` or the ``random`` module."""

    def sample(self, population: Sequence[Any], k: int) -> list[Any]: ...

    def shuffle(self, x: list[Any]) -> None: ...


class FewShotTasks:
    """Few-shot tasks from any labelled dataset; task ``i`` is a pure function of (seed, i).

    Every task has ``ways`` classes drawn without replacement from the dataset's classes
    and, per class, ``shots`` support and ``query_shots`` query samples, all distinct. The
    task's classes get labels ``0..ways-1`` in random order. Support samples come grouped by
    label (``shots`` of label 0, then label 1, ...), and so do query samples.

    ``num_tasks=-1`` gives an endless stream: ``sample()`` returns tasks 0, 1, 2, ... in turn
    and ``tasks[i]`` works for any ``i >= 0``. ``num_tasks=n`` gives a fixed pool of n tasks
    (for evaluation): ``len(tasks) == n``, iteration yields tasks 0..n-1 and ``sample()``
    picks a pool task at random (from the seed). ``seed=None`` draws a seed, kept in
    ``.seed``. Per-sample random transforms that use Python's, numpy's or torch's global
    generators are reproducible too.

    ``device`` (e.g. ``"cuda"``) keeps the whole split on that device as stored (uint8 for
    the image datasets) and builds every task there, bit-identical to the host's tasks;
    it needs a dataset whose layout :func:`~l2l_adversarial.data.device.image_table` knows.

    Example::

        tasks = FewShotTasks(Digits("train"), ways=5, shots=1, query_shots=15, seed=0)
        support_x, support_y, query_x, query_y = tasks.sample()
        again = FewShotTasks(Digits("train"), 5, 1, 15, seed=0)
        torch.equal(tasks[7].query_inputs, again[7].query_inputs)  # True
    """

    def __init__(
        self,
        dataset: Any,
        ways: int,
        shots: int,
        query_shots: int,
        num_tasks: int = -1,
        seed: int | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        _check_count("ways", ways, 1)
        _check_count("shots", shots, 1)
        _check_count("query_shots", query_shots, 1)
        if num_tasks != -1:
            _check_count("num_tasks (or -1 for an endless stream)", num_tasks, 1)
        if seed is None:
            seed = random.SystemRandom().randrange(2**63)
        _check_count("seed", seed, 0)
        self.meta_dataset = as_meta_dataset(dataset)
        self._check_size(ways, shots, query_shots)
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        self.num_tasks, self.seed = num_tasks, seed
        #: the split as one tensor to gather tasks from, or None: loaded per sample.
        self.table = image_table(self.meta_dataset, "cpu" if device is None else device)
        if device is not None and self.table is None:
            raise ValueError(
                f"device={str(device)!r} keeps the images on the device, which needs a "
                "dataset of this package (without transform) or a TensorDataset; "
                f"got {type(self.meta_dataset.dataset).__name__}: pass device=None"
            )
        self._next_index = 0
        self._pool_choice = random.Random(seed)

    def _check_size(self, ways: int, shots: int, query_shots: int) -> None:
        """Raise :class:`TaskSizeError`, naming the split, the class and the counts, unless
        every task can be filled."""
        dataset = self.meta_dataset.dataset
        name, mode, root = (getattr(dataset, key, None) for key in ("NAME", "mode", "root"))
        split = f"the {name} {mode} split" if name and mode else f"the {type(dataset).__name__}"
        split += f" in {str(root)!r}" if root else ""
        counts = {label: len(rows) for label, rows in self.meta_dataset.labels_to_indices.items()}
        if len(counts) < ways:
            raise TaskSizeError(
                f"a task takes ways={ways} classes, but {split} has {len(counts)}; lower ways "
                "(task.ways), or give this split more classes (an image folder's "
                "dataset.split_ratio or dataset.split_file; docs/data-formats.md)"
            )
        per_class = shots + query_shots
        short = sorted((count, label) for label, count in counts.items() if count < per_class)
        if short:
            count, label = short[0]
            names = getattr(dataset, "classes", None)
            others = f" ({len(short) - 1} more classes too)" if len(short) > 1 else ""
            raise TaskSizeError(
                f"a task takes shots + query_shots = {shots} + {query_shots} = {per_class} "
                f"samples of a class, but class {names[label] if names else label!r} of {split} "
                f"has {count}{others}; lower task.shots or task.query_shots, or drop the small "
                "classes from the dataset"
            )

    @property
    def device(self) -> torch.device:
        """Where the tasks are made (the CPU unless ``device=`` kept the images elsewhere)."""
        return torch.device("cpu") if self.table is None else self.table.device

    @property
    def thread_safe(self) -> bool:
        """Whether tasks may be built from several threads at once (no global generators:
        true unless the dataset is loaded per sample, see the module doc)."""
        return self.table is not None

    def __len__(self) -> int:
        if self.num_tasks == -1:
            raise TypeError(
                "this task stream is endless (num_tasks=-1); pass num_tasks=n for a pool"
            )
        return self.num_tasks

    def __getitem__(self, index: int) -> Task:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"task index must be an int, got {type(index).__name__}")
        if index < 0 or (self.num_tasks != -1 and index >= self.num_tasks):
            bound = "any int >= 0" if self.num_tasks == -1 else f"[0, {self.num_tasks})"
            raise IndexError(f"task index {index} out of range: expected {bound}")
        return self._task(index)

    def __iter__(self) -> Iterator[Task]:
        indices = itertools.count() if self.num_tasks == -1 else range(self.num_tasks)
        return (self._task(index) for index in indices)

    def sample(self) -> Task:
        """The next task of the stream, or a random task of the pool (both from the seed)."""
        if self.num_tasks != -1:
            return self._task(self._pool_choice.randrange(self.num_tasks))
        index, self._next_index = self._next_index, self._next_index + 1
        return self._task(index)

    def _draw(self, rng: _Sampler) -> tuple[list[int], list[int], list[int]]:
        """learn2learn's draws for one task: (rows in its load order, the positions in that
        list of the support samples grouped by label, of the query samples likewise).

        The same calls, in the same order, as ``NWays`` (first: a sample of the classes),
        ``KShots`` (a sample of each class's rows) and ``RemapLabels`` (a shuffle of the
        set of the task's classes; label ``j`` is the ``j``-th class after it).
        """
        per_class = self.shots + self.query_shots
        meta = self.meta_dataset
        classes = rng.sample(meta.labels, k=self.ways)
        chosen = [rng.sample(meta.labels_to_indices[label], k=per_class) for label in classes]
        remapped = list(set(label for label in classes for _ in range(per_class)))  # as RemapLabels
        rng.shuffle(remapped)
        starts = [classes.index(label) * per_class for label in remapped]
        support = [start + shot for start in starts for shot in range(self.shots)]
        query = [start + shot for start in starts for shot in range(self.shots, per_class)]
        return [row for rows in chosen for row in rows], support, query

    def _task(self, index: int) -> Task:
        task_seed = derive_seed(self.seed, index)
        if self.table is None:
            with _global_random_state(task_seed):
                rows, support, query = self._draw(random)
                loaded = torch.stack([self.meta_dataset[row][0] for row in rows])
            support_inputs = loaded.index_select(0, torch.tensor(support))
            query_inputs = loaded.index_select(0, torch.tensor(query))
        else:
            rows, support, query = self._draw(random.Random(task_seed))
            images = self.table.gather(torch.tensor([rows[at] for at in support + query]))
            support_inputs, query_inputs = images[: len(support)], images[len(support) :]
        labels = torch.arange(self.ways, device=support_inputs.device)
        return Task(
            support_inputs=support_inputs,
            support_labels=labels.repeat_interleave(self.shots),
            query_inputs=query_inputs,
            query_labels=labels.repeat_interleave(self.query_shots),
        )

    def __repr__(self) -> str:
        size = "endless" if self.num_tasks == -1 else f"num_tasks={self.num_tasks}"
        return (
            f"FewShotTasks(ways={self.ways}, shots={self.shots}, query_shots={self.query_shots}, "
            f"{size}, seed={self.seed})"
        )


def fixed_tasks(
    dataset: Any,
    ways: int,
    shots: int,
    query_shots: int,
    num_tasks: int,
    seed: int,
    *,
    device: torch.device | str | None = None,
) -> FewShotTasks:
    """A fixed pool of ``num_tasks`` evaluation tasks: the same for every method given ``seed``.

    Tasks are produced on access (not held in memory): ``tasks[i]`` depends only on
    ``(seed, i)`` and the dataset.

    Example::

        for task in fixed_tasks(Digits("test"), 5, 5, 15, num_tasks=600, seed=1):
            ...
    """
    return FewShotTasks(
        dataset, ways, shots, query_shots, num_tasks=num_tasks, seed=seed, device=device
    )
