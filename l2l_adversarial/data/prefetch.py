"""Meta-batches built ahead of the training loop, in a thread or in worker processes.

Task ``i`` is a pure function of ``(seed, i)`` (:class:`~l2l_adversarial.data.FewShotTasks`),
so building it earlier, in another thread or in another process changes nothing in it:
prefetched and resumed runs see the same tasks, bit for bit, as a run that builds each task
when it needs it.

- ``workers=0, prefetch=0``: each meta-batch is built when the loop asks for it.
- ``workers=0, prefetch=k``: one background thread keeps ``k`` meta-batches ready. Needs a
  thread-safe task source (``tasks.thread_safe``: :class:`FewShotTasks` that gathers from an
  image table); PyTorch releases the GIL inside its operators, so building overlaps compute.
- ``workers=n``: a ``torch.utils.data.DataLoader`` over iteration numbers with ``n`` worker
  processes, ``max(k, 1)`` meta-batches ahead per worker; for task sources that draw from
  the global generators (per-sample random transforms), which each worker seeds per task.

On CUDA, host tasks are put in pinned memory while being built and copied with
``non_blocking=True``; tasks already on the device (``FewShotTasks(device=...)``) stay there.

``check`` (e.g. the training loop's value checks)
runs on every meta-batch where it is built, in the thread or the worker process, before the
copy to the device: host tasks are then read in host memory, and the loop itself reads nothing.
What it raises reaches the loop unchanged, when the loop asks for that meta-batch.

Example:
    >>> from l2l_adversarial.data import FewShotTasks
    >>> tasks = FewShotTasks((torch.rand(40, 3), torch.arange(40) % 4), 2, 1, 1, seed=0)
    >>> batches = MetaBatches(tasks, lambda it: [2 * it, 2 * it + 1], 0, 3, prefetch=2)
    >>> [[index for index, _ in batch] for batch in batches]
    [[0, 1], [2, 3], [4, 5]]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from l2l_adversarial.task import Task

__all__ = ["MetaBatch", "MetaBatches", "default_loading"]

MetaBatch = list[tuple[int, Task]]
"""One meta-iteration's tasks with their global task indices."""
Check = Callable[[MetaBatch], None]
"""Called on each meta-batch where it is built; raises to refuse it."""


def default_loading(tasks: Any, device: torch.device) -> tuple[int, int]:
    """``(workers, prefetch)`` when the config leaves them unset: a thread two meta-batches
    ahead for a thread-safe task source, else nothing ahead; no worker processes (each one is
    another copy of the process, and on a 2-core CPU competes with training for a core).
    The documentation's performance page (Data loading) has what the wait for data measured."""
    del device  # the same choice on the CPU and on CUDA until a GPU measures otherwise
    return 0, 2 if getattr(tasks, "thread_safe", False) else 0


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def _built(tasks: Any, indices: Sequence[int], check: Check | None) -> MetaBatch:
    batch = [(index, tasks[index]) for index in indices]
    if check is not None:
        check(batch)
    return batch


class _IterationBatches(Dataset[MetaBatch | Exception]):
    """Item ``it``: the meta-batch of iteration ``it`` (built in a worker process), or the
    error its check raised (passed back as it is, not wrapped by the DataLoader)."""

    def __init__(
        self, tasks: Any, indices: Callable[[int], Sequence[int]], check: Check | None
    ) -> None:
        self.tasks, self.indices, self.check = tasks, indices, check

    def __getitem__(self, iteration: int) -> MetaBatch | Exception:
        try:
            return _built(self.tasks, self.indices(iteration), self.check)
        except (TypeError, ValueError) as error:
            return error


class MetaBatches:
    """The meta-batches of iterations ``start .. stop - 1``, in order, on ``device``.

    Batch ``it`` is ``[(i, tasks[i]) for i in indices(it)]``. Iterate once; :meth:`close`
    (or leaving a ``with`` block) stops the background work early.
    """

    def __init__(
        self,
        tasks: Any,
        indices: Callable[[int], Sequence[int]],
        start: int,
        stop: int,
        *,
        device: torch.device | str = "cpu",
        workers: int = 0,
        prefetch: int = 0,
        check: Check | None = None,
    ) -> None:
        _check_count("workers", workers)
        _check_count("prefetch", prefetch)
        self.device = torch.device(device)
        on_device = getattr(tasks, "device", torch.device("cpu")).type != "cpu"
        if workers and on_device:
            raise ValueError(
                "train.workers > 0 builds tasks in worker processes, which cannot use the "
                "images kept on the device (dataset.device_resident); set train.workers=0"
            )
        if prefetch and not workers and not getattr(tasks, "thread_safe", False):
            raise ValueError(
                f"train.prefetch={prefetch} with train.workers=0 builds tasks in a thread, but "
                f"this task source ({type(tasks).__name__}) draws from the global random "
                "generators; set train.workers >= 1 (worker processes) or train.prefetch=0"
            )
        self.tasks, self.indices, self.start, self.stop = tasks, indices, start, stop
        self.workers, self.prefetch, self.check = workers, prefetch, check
        self._pin = self.device.type == "cuda" and not on_device
        self._executor: ThreadPoolExecutor | None = None
        self._pending: deque[Future[MetaBatch]] = deque()

    def _build(self, iteration: int) -> MetaBatch:
        batch = _built(self.tasks, self.indices(iteration), self.check)
        if self._pin:
            batch = [(index, Task(*(t.pin_memory() for t in task))) for index, task in batch]
        return batch

    def _to_device(self, batch: Sequence[Sequence[Any]] | Exception) -> MetaBatch:
        if isinstance(batch, Exception):  # refused by the check in a worker process
            raise batch
        return [
            (int(index), Task(*(t.to(self.device, non_blocking=True) for t in task)))
            for index, task in batch
        ]

    def __iter__(self) -> Generator[MetaBatch, None, None]:
        iterations = range(self.start, self.stop)
        if self.workers:
            loader = DataLoader(
                _IterationBatches(self.tasks, self.indices, self.check),
                batch_size=None,
                sampler=iterations,
                num_workers=self.workers,
                prefetch_factor=max(self.prefetch, 1),
                pin_memory=self._pin,
                # the loader's own seed comes from here, not from the global generator
                generator=torch.Generator().manual_seed(0),
            )
            yield from (self._to_device(batch) for batch in loader)
            return
        if not self.prefetch:
            yield from (self._to_device(self._build(it)) for it in iterations)
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meta-batches")
        upcoming = iter(iterations)
        try:
            for iteration in upcoming:
                self._pending.append(self._executor.submit(self._build, iteration))
                if len(self._pending) >= self.prefetch:
                    break
            while self._pending:
                batch = self._pending.popleft().result()
                next_iteration = next(upcoming, None)
                if next_iteration is not None:
                    self._pending.append(self._executor.submit(self._build, next_iteration))
                yield self._to_device(batch)
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the meta-batches not yet built and stop the thread."""
        while self._pending:
            self._pending.popleft().cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self) -> MetaBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
