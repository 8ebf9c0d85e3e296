"""Time per task for each data path, and the time a meta-iteration waits for its tasks.

The dataset is a generated MiniImageNet cache (``image x image x 3`` uint8 images, 64 classes,
``IMAGES_PER_CLASS`` each; the time per task does not depend on how many images a class has)
loaded by :class:`~l2l_adversarial.data.MiniImageNet`. Rows:

- ``task: learn2learn Taskset, per sample``: what ``FewShotTasks`` did before issue 12
  (learn2learn's ``Taskset`` with ``NWays``/``KShots``/``LoadData``/``RemapLabels`` from the
  global generators, one ``dataset[i]`` with a float conversion per image, a stack);
- ``task: per sample``: today's path for a dataset with a ``transform``;
- ``task: gathered, host``: today's default (one ``index_select`` per set from the uint8
  image table in host memory, one float conversion);
- ``task: gathered, device-resident``: the table kept on the benchmark's device
  (``dataset.device_resident: true``; the same as the host row on the CPU);
- ``task part: ...``: a gathered task's row gather and float conversion on their own;
- ``meta-iteration ...``: one MAML meta-iteration (``meta_loss`` per task, Adam) with its
  meta-batch taken from :class:`~l2l_adversarial.data.prefetch.MetaBatches` built in place, by
  a prefetch thread or by a worker process; against ``tasks ready`` the difference is the wait
  for data. Each row's ``extra_info`` (``--benchmark-json``) holds the measured data wait.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from learn2learn.data import Taskset
from learn2learn.data.transforms import KShots, LoadData, NWays, RemapLabels
from pytest_benchmark.fixture import BenchmarkFixture

from l2l_adversarial import CNN4, MAML
from l2l_adversarial.data import FewShotTasks, MiniImageNet
from l2l_adversarial.data.prefetch import MetaBatch, MetaBatches
from l2l_adversarial.data.tasks import _global_random_state

from .conftest import Measure, Size

CLASSES, IMAGES_PER_CLASS = 64, 40


def write_generated_cache(
    root: Path, mode: str, image: int, classes: int = CLASSES, per_class: int = IMAGES_PER_CLASS
) -> None:
    """A MiniImageNet-format cache of random uint8 ``image x image x 3`` images (seeded)."""
    rng = np.random.default_rng(0)
    count = classes * per_class
    images = rng.integers(0, 256, (count, image, image, 3), dtype=np.uint8)
    rows = {f"n{label:08d}": list(range(label, count, classes)) for label in range(classes)}
    root.mkdir(parents=True, exist_ok=True)
    with open(MiniImageNet.file_path(root, mode), "wb") as file:
        pickle.dump({"image_data": images, "class_dict": rows}, file, protocol=4)


@pytest.fixture(scope="session")
def mini_imagenet(tmp_path_factory: pytest.TempPathFactory, size: Size) -> MiniImageNet:
    """A generated MiniImageNet-format train cache at this size's image side."""
    root = tmp_path_factory.mktemp(f"mini-imagenet-{size.name}")
    write_generated_cache(root, "train", size.image)
    return MiniImageNet(root, "train", strict=False)


def _tasks(dataset: object, size: Size, **options: object) -> FewShotTasks:
    return FewShotTasks(dataset, size.ways, size.shots, size.queries, seed=0, **options)  # type: ignore[arg-type]


def _maml(size: Size, device: torch.device) -> tuple[MAML, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = CNN4(size.ways, 3, size.hidden, size.image)
    learner = MAML(model, lr=0.01, adaptation_steps=size.steps).to(device)
    return learner, torch.optim.Adam(learner.parameters(), 0.001)


def _stream(get: Callable[[int], object]) -> Callable[[], object]:
    """A function that builds the next task on each call (no task is built twice)."""
    counter = iter(range(10**9))
    return lambda: get(next(counter))


def test_task_learn2learn_taskset(
    measure: Measure, size: Size, mini_imagenet: MiniImageNet
) -> None:
    tasks = _tasks(mini_imagenet, size)
    meta, per_class = tasks.meta_dataset, size.shots + size.queries
    taskset = Taskset(
        meta, [NWays(meta, size.ways), KShots(meta, per_class), LoadData(meta), RemapLabels(meta)]
    )

    def task(index: int) -> object:
        with _global_random_state(index):
            inputs, labels = taskset.get_task(taskset.sample_task_description())
        return inputs.index_select(0, torch.sort(labels, stable=True).indices)

    measure("task: learn2learn Taskset, per sample", _stream(task))


def test_task_per_sample(measure: Measure, size: Size, mini_imagenet: MiniImageNet) -> None:
    transformed = MiniImageNet(mini_imagenet.root, "train", strict=False, transform=torch.clone)
    tasks = _tasks(transformed, size)
    assert tasks.table is None
    measure("task: per sample (dataset with a transform)", _stream(tasks.__getitem__))


def test_task_gathered_host(measure: Measure, size: Size, mini_imagenet: MiniImageNet) -> None:
    tasks = _tasks(mini_imagenet, size)
    assert tasks.table is not None
    measure("task: gathered, host image table (default)", _stream(tasks.__getitem__))


def test_task_device_resident(
    measure: Measure, size: Size, mini_imagenet: MiniImageNet, device: torch.device
) -> None:
    tasks = _tasks(mini_imagenet, size, device=device)
    measure(f"task: gathered, device-resident ({device.type})", _stream(tasks.__getitem__))


@pytest.mark.parametrize("part", ["row gather", "float conversion alone", "gather and conversion"])
def test_task_part(measure: Measure, size: Size, mini_imagenet: MiniImageNet, part: str) -> None:
    """What a gathered task's time is made of, on one task's worth of rows: the uint8 row
    gather, the float conversion alone without the division (the floor of any exact path),
    and ``ImageTable.gather`` (both, with the division by 255)."""
    table = _tasks(mini_imagenet, size).table
    assert table is not None
    rows = torch.arange(size.ways * (size.shots + size.queries)) * 7 % len(table)
    batch = table.images.index_select(0, rows)
    parts = {
        "row gather": lambda: table.images.index_select(0, rows),
        "float conversion alone": lambda: batch.to(torch.float32),
        "gather and conversion": lambda: table.gather(rows),
    }
    measure(f"task part: {part} ({len(rows)} images)", parts[part])


@pytest.mark.parametrize(
    ("workers", "prefetch"), [(0, 0), (0, 2), (1, 2)], ids=["in-place", "thread", "worker"]
)
def test_meta_iteration_waiting_for_data(
    benchmark: BenchmarkFixture,
    measure: Measure,
    size: Size,
    mini_imagenet: MiniImageNet,
    device: torch.device,
    workers: int,
    prefetch: int,
) -> None:
    tasks = _tasks(mini_imagenet, size)
    learner, optimizer = _maml(size, device)
    batch_size = size.meta_batch
    batches: Iterator[MetaBatch] = iter(
        MetaBatches(
            tasks,
            lambda it: range(it * batch_size, (it + 1) * batch_size),
            0,
            10**6,
            device=device,
            workers=workers,
            prefetch=prefetch,
        )  # fmt: skip
    )
    waited: list[float] = []

    def iteration() -> None:
        start = time.perf_counter()
        batch = next(batches)
        waited.append(time.perf_counter() - start)
        optimizer.zero_grad()
        for _, task in batch:
            (learner.meta_loss(*task) / len(batch)).backward()
        optimizer.step()

    label = {(0, 0): "built in place", (0, 2): "prefetch thread, 2 ahead",
             (1, 2): "1 worker process, 2 ahead"}[workers, prefetch]  # fmt: skip
    measure(f"meta-iteration (MAML), tasks {label}", iteration)
    benchmark.extra_info["data_wait_seconds"] = waited
    batches.close()  # type: ignore[attr-defined]


def test_meta_iteration_tasks_ready(
    measure: Measure, size: Size, mini_imagenet: MiniImageNet, device: torch.device
) -> None:
    tasks = _tasks(mini_imagenet, size, device=device)
    tasks_ready = [tasks[index] for index in range(size.meta_batch)]
    learner, optimizer = _maml(size, device)

    def iteration() -> None:
        optimizer.zero_grad()
        for task in tasks_ready:
            (learner.meta_loss(*task) / len(tasks_ready)).backward()
        optimizer.step()

    measure("meta-iteration (MAML), tasks ready", iteration)


def test_paths_agree(size: Size, mini_imagenet: MiniImageNet, device: torch.device) -> None:
    """The rows above time the same tasks (an untimed check): gathered == per sample."""
    transformed = MiniImageNet(mini_imagenet.root, "train", strict=False, transform=torch.clone)
    paths = [_tasks(mini_imagenet, size, device=device), _tasks(transformed, size)]
    for index in range(2):
        resident, per_sample = (tasks[index] for tasks in paths)
        for a, b in zip(resident, per_sample, strict=True):
            assert torch.equal(a.cpu(), b)
