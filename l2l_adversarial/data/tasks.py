"""N-way K-shot tasks with a separate query set, reproducible from a seed.

Tasks are drawn by learn2learn's ``Taskset`` (formerly ``TaskDataset``) with the task transforms ``NWays``,
``KShots``, ``LoadData`` and ``RemapLabels``. learn2learn draws from Python's global
``random``; here task ``i`` is drawn with the global generators (``random``, numpy's and
torch's CPU generator) seeded from ``(seed, i)`` and restored afterwards, so task ``i`` is
the same whatever else consumed random numbers, and sampling leaves the caller's random
state untouched (not thread-safe: do not sample from several threads at once).

learn2learn 0.2.0's ``NWays`` calls ``random.sample`` on a set when it is not the first
transform, which Python >= 3.11 rejects (``TypeError: Population must be a sequence``);
``NWays`` is therefore always the first transform here.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from learn2learn.data import MetaDataset, Taskset
from learn2learn.data.transforms import KShots, LoadData, NWays, RemapLabels
from torch import Tensor
from torch.utils.data import TensorDataset

from l2l_adversarial.seeding import derive_seed
from l2l_adversarial.task import Task

__all__ = ["FewShotTasks", "as_meta_dataset", "fixed_tasks"]


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
        per_class = shots + query_shots
        counts = {label: len(rows) for label, rows in self.meta_dataset.labels_to_indices.items()}
        if len(counts) < ways:
            raise ValueError(
                f"ways={ways} but the dataset has only {len(counts)} classes; lower ways"
            )
        short = sorted(label for label, count in counts.items() if count < per_class)
        if short:
            raise ValueError(
                f"every class needs shots + query_shots = {per_class} samples, but class(es) "
                f"{short[:10]} have only {min(counts[label] for label in short)}; lower shots "
                "or query_shots, or drop the small classes from the dataset"
            )
        self.ways, self.shots, self.query_shots = ways, shots, query_shots
        self.num_tasks, self.seed = num_tasks, seed
        meta = self.meta_dataset
        #: learn2learn's Taskset that draws the tasks; NWays must stay first (see module doc).
        self.taskset = Taskset(
            meta,
            task_transforms=[
                NWays(meta, ways),
                KShots(meta, per_class),
                LoadData(meta),
                RemapLabels(meta),
            ],
            num_tasks=-1,
        )
        self._next_index = 0
        self._pool_choice = random.Random(seed)

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

    def _task(self, index: int) -> Task:
        task_seed = derive_seed(self.seed, index)
        with _global_random_state(task_seed):
            inputs, labels = self.taskset.get_task(self.taskset.sample_task_description())
        order = torch.sort(labels, stable=True).indices
        per_class = self.shots + self.query_shots
        inputs = inputs.index_select(0, order).reshape(self.ways, per_class, *inputs.shape[1:])
        labels = labels.index_select(0, order).long().reshape(self.ways, per_class)
        sample_shape = inputs.shape[2:]
        return Task(
            support_inputs=inputs[:, : self.shots].reshape(-1, *sample_shape),
            support_labels=labels[:, : self.shots].reshape(-1),
            query_inputs=inputs[:, self.shots :].reshape(-1, *sample_shape),
            query_labels=labels[:, self.shots :].reshape(-1),
        )

    def __repr__(self) -> str:
        size = "endless" if self.num_tasks == -1 else f"num_tasks={self.num_tasks}"
        return (
            f"FewShotTasks(ways={self.ways}, shots={self.shots}, query_shots={self.query_shots}, "
            f"{size}, seed={self.seed})"
        )


def fixed_tasks(
    dataset: Any, ways: int, shots: int, query_shots: int, num_tasks: int, seed: int
) -> FewShotTasks:
    """A fixed pool of ``num_tasks`` evaluation tasks: the same for every method given ``seed``.

    Tasks are produced on access (not held in memory): ``tasks[i]`` depends only on
    ``(seed, i)`` and the dataset.

    Example::

        for task in fixed_tasks(Digits("test"), 5, 5, 15, num_tasks=600, seed=1):
            ...
    """
    return FewShotTasks(dataset, ways, shots, query_shots, num_tasks=num_tasks, seed=seed)
