"""Data pipeline: tasks equal learn2learn's, gathered tasks equal per-sample tasks, meta-batches
built ahead equal those built in place, data wait logged, deterministic settings."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from data_factories import write_cifar100, write_mini_imagenet_cache
from learn2learn.data import Taskset
from learn2learn.data.transforms import KShots, LoadData, NWays, RemapLabels
from torch.utils.data import Dataset, TensorDataset

from l2l_adversarial import Task
from l2l_adversarial.app.checkpoint import load_checkpoint
from l2l_adversarial.app.config import ConfigError, load_config
from l2l_adversarial.app.reproducibility import CUBLAS_WORKSPACE, apply_deterministic_settings
from l2l_adversarial.app.training import CHECKPOINT, train
from l2l_adversarial.data import CIFAR100Meta, Digits, FewShotTasks, MiniImageNet
from l2l_adversarial.data._images import uint8_to_float
from l2l_adversarial.data.device import ImageTable, image_table
from l2l_adversarial.data.prefetch import MetaBatches
from l2l_adversarial.data.tasks import _global_random_state
from l2l_adversarial.validation import value_checks, value_checks_enabled


def learn2learn_task(tasks: FewShotTasks, index: int) -> Task:
    """Task ``index`` as learn2learn's Taskset draws it (NWays, KShots, LoadData, RemapLabels
    from the global generators seeded from (seed, index)), grouped by label: the reference."""
    meta, per_class = tasks.meta_dataset, tasks.shots + tasks.query_shots
    transforms = [NWays(meta, tasks.ways), KShots(meta, per_class), LoadData(meta),
                  RemapLabels(meta)]  # fmt: skip
    taskset = Taskset(meta, task_transforms=transforms, num_tasks=-1)
    seed = int(np.random.SeedSequence([tasks.seed, index]).generate_state(1, np.uint64)[0])
    with _global_random_state(seed):
        inputs, labels = taskset.get_task(taskset.sample_task_description())
    order = torch.sort(labels, stable=True).indices
    inputs = inputs.index_select(0, order).reshape(tasks.ways, per_class, *inputs.shape[1:])
    labels = labels.index_select(0, order).reshape(tasks.ways, per_class)
    shots, shape = tasks.shots, inputs.shape[2:]
    return Task(
        inputs[:, :shots].reshape(-1, *shape), labels[:, :shots].reshape(-1),
        inputs[:, shots:].reshape(-1, *shape), labels[:, shots:].reshape(-1),
    )  # fmt: skip


def assert_same_task(first: Task, second: Task) -> None:
    for a, b in zip(first, second, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous()
        assert torch.equal(a, b)


class Noisy(Dataset):
    """A dataset whose items draw from Python's, numpy's and torch's global generators."""

    targets = [7, 3, 5, 1] * 6

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        noise = torch.rand(2) + random.random() + float(np.random.rand())
        return noise + index, self.targets[index]


def shuffled_tensors() -> TensorDataset:
    labels = torch.randperm(240, generator=torch.Generator().manual_seed(0)) % 24 * 5 + 11
    return TensorDataset(torch.randn(240, 3, 2, 2), labels)


def test_tasks_are_the_tasks_learn2learns_taskset_draws(tmp_path: Path) -> None:
    write_mini_imagenet_cache(tmp_path, "train", num_classes=6, images_per_class=6, image_size=8)
    write_cifar100(tmp_path, train_per_class=5, test_per_class=1)
    cases = [  # (dataset, gathered from an image table)
        (shuffled_tensors(), True),
        (MiniImageNet(tmp_path, "train", strict=False), True),
        (CIFAR100Meta(tmp_path, "train", strict=False), True),
        (Digits("test", image_size=8), True),
        (Noisy(), False),  # a random per-sample transform: loaded per sample
        (Digits("test", image_size=8, transform=lambda x: x + torch.rand(())), False),
    ]
    for dataset, gathered in cases:
        for ways, shots, queries in ((4, 1, 2), (3, 2, 3)):
            tasks = FewShotTasks(dataset, ways, shots, queries, seed=17)
            assert (tasks.table is not None) == gathered == tasks.thread_safe
            for index in (0, 1, 5, 12):
                assert_same_task(tasks[index], learn2learn_task(tasks, index))


def test_the_image_table_gives_each_datasets_own_items(tmp_path: Path) -> None:
    write_mini_imagenet_cache(tmp_path, "train", num_classes=3, images_per_class=4, image_size=8)
    write_cifar100(tmp_path, train_per_class=2, test_per_class=1)
    for dataset in (
        MiniImageNet(tmp_path, "train", strict=False),
        CIFAR100Meta(tmp_path, "train", strict=False),
        Digits("train", image_size=5),
        shuffled_tensors(),
    ):
        table = image_table(dataset)
        assert table is not None and table.device == torch.device("cpu")
        rows = torch.tensor([2, 0, 2, len(dataset) - 1])
        expected = torch.stack([dataset[int(row)][0] for row in rows])
        gathered = table.gather(rows)
        assert gathered.dtype == expected.dtype and gathered.is_contiguous()
        assert torch.equal(gathered, expected)
    assert image_table(MiniImageNet(tmp_path, "train", strict=False, transform=torch.neg)) is None
    assert image_table(Noisy()) is None
    with pytest.raises(TypeError, match="uint8"):
        ImageTable(torch.zeros(2, 3), channels_last=False, scale=True)


def test_the_tables_conversions_give_the_per_sample_values_for_every_byte() -> None:
    """The conversion is elementwise on uint8: equal on all 256 values, equal on any image.
    The CPU table's (numpy) and the device table's (torch, 0-dim divisor), both run here."""
    every = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    expected = uint8_to_float(every[0], channels_last=True)
    table = ImageTable(every, channels_last=True, scale=True)
    assert torch.equal(table.gather(torch.tensor([0]))[0], expected)
    on_device = table.images.to(torch.float32).div_(table._levels)  # what CUDA runs
    assert torch.equal(on_device[0], expected)


def test_device_resident_tasks_equal_the_per_sample_tasks(tmp_path: Path) -> None:
    write_mini_imagenet_cache(tmp_path, "train", num_classes=6, images_per_class=5, image_size=8)
    dataset = MiniImageNet(tmp_path, "train", strict=False)
    resident = FewShotTasks(dataset, 5, 1, 3, seed=4, device="cpu")
    assert resident.device == torch.device("cpu") and resident.table is not None
    assert resident.table.images.dtype == torch.uint8  # kept as stored
    per_sample = FewShotTasks(dataset, 5, 1, 3, seed=4)
    per_sample.table = None  # force the per-sample loading path
    for index in range(6):
        assert_same_task(resident[index], per_sample[index])
    with pytest.raises(ValueError, match="pass device=None"):
        FewShotTasks(Noisy(), 2, 1, 1, seed=0, device="cpu")


def test_gathered_sampling_touches_no_global_generator() -> None:
    tasks = FewShotTasks(shuffled_tensors(), 5, 1, 2, seed=0)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    with _global_random_state(123):  # the global generators are not even read
        inside = random.getstate()
        tasks[3]
        assert random.getstate() == inside
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


def _indices(iteration: int) -> list[int]:
    return [3 * iteration, 3 * iteration + 1, 3 * iteration + 2]


@pytest.mark.parametrize(("workers", "prefetch"), [(0, 1), (0, 3), (1, 0), (2, 2)])
def test_meta_batches_built_ahead_equal_those_built_in_place(workers: int, prefetch: int) -> None:
    tasks = FewShotTasks(shuffled_tensors(), 4, 1, 2, seed=9)
    in_place = list(MetaBatches(tasks, _indices, 2, 6))
    torch_state = torch.get_rng_state()
    ahead = list(MetaBatches(tasks, _indices, 2, 6, workers=workers, prefetch=prefetch))
    assert torch.equal(torch.get_rng_state(), torch_state)  # the loader draws no global seed
    assert [[i for i, _ in batch] for batch in ahead] == [_indices(it) for it in range(2, 6)]
    for first, second in zip(in_place, ahead, strict=True):
        for (i, a), (j, b) in zip(first, second, strict=True):
            assert i == j
            assert_same_task(a, b)
            assert_same_task(a, tasks[i])


def test_per_sample_sources_are_prefetched_in_processes_only() -> None:
    noisy = FewShotTasks(Noisy(), 2, 1, 1, seed=1)
    with pytest.raises(ValueError, match="train.workers >= 1"):
        MetaBatches(noisy, _indices, 0, 2, prefetch=2)
    ahead = list(MetaBatches(noisy, _indices, 0, 2, workers=1, prefetch=2))
    for batch in ahead:
        for index, task in batch:
            assert_same_task(task, noisy[index])
    with pytest.raises(ValueError, match="prefetch must be an int >= 0"):
        MetaBatches(noisy, _indices, 0, 2, prefetch=-1)


def test_closing_stops_the_prefetch_thread() -> None:
    tasks = FewShotTasks(shuffled_tensors(), 4, 1, 2, seed=9)
    batches = MetaBatches(tasks, _indices, 0, 1000, prefetch=2)
    iterator = iter(batches)
    next(iterator)
    iterator.close()
    assert batches._executor is None and not batches._pending


def digits_config(**train_options: object) -> dict:
    overrides = ["method=maml", "dataset.name=digits", "device=cpu", "task.ways=3",
                 "task.shots=1", "task.query_shots=2", "model.hidden=4", "train.iterations=6",
                 "train.meta_batch_size=2", "train.adaptation_steps=1", "train.checkpoint_every=2",
                 "train.log_every=2"]  # fmt: skip
    return load_config(None, [*overrides, *(f"train.{k}={v}" for k, v in train_options.items())])


class Killed(Exception):
    pass


def _kill_at(iteration: int):  # noqa: ANN202
    def hook(current: int) -> None:
        if current == iteration:
            raise Killed

    return hook


def test_resume_with_worker_processes_matches_a_run_built_in_place(tmp_path: Path) -> None:
    def tasks() -> FewShotTasks:
        return FewShotTasks(Digits("train", image_size=16), 3, 1, 2, seed=0)

    plain = train(digits_config(workers=0, prefetch=0), tmp_path / "a", tasks(), progress=False)
    cfg = digits_config(workers=1, prefetch=2)
    with pytest.raises(Killed):
        train(cfg, tmp_path / "b", tasks(), progress=False, on_iteration=_kill_at(3))
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT, kind="train")["iteration"] == 2
    resumed = train(cfg, tmp_path / "b", tasks(), resume=True, progress=False)
    threaded = train(digits_config(prefetch=3), tmp_path / "c", tasks(), progress=False)
    for a, b, c in zip(
        plain.parameters(), resumed.parameters(), threaded.parameters(), strict=True
    ):
        assert torch.equal(a, b) and torch.equal(a, c)
    header, *rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert header.split(",") == [
        "iteration",
        "loss",
        "accuracy",
        "seconds",
        "data_seconds",
        "engine",
    ]
    assert [row.split(",")[0] for row in rows] == ["2", "4", "6"]
    for row in rows:
        seconds, data_seconds = (float(v) for v in row.split(",")[3:5])
        assert 0.0 <= data_seconds <= seconds


def test_loading_and_determinism_config_keys() -> None:
    cfg = load_config(None, ["dataset.name=digits"])
    assert cfg["train"]["workers"] is None and cfg["train"]["prefetch"] is None
    assert cfg["train"]["deterministic"] is True and cfg["dataset"]["device_resident"] is False
    with pytest.raises(ConfigError, match="train.workers"):
        load_config(None, ["dataset.name=digits", "train.workers=-1"])
    with pytest.raises(ConfigError, match="dataset.device_resident"):
        load_config(None, ["dataset.name=digits", "dataset.device_resident=maybe"])


@pytest.fixture
def restore_backend_flags():  # noqa: ANN201
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[4], saved[5]
    if saved[6] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[6]


def test_deterministic_settings_for_cuda(
    restore_backend_flags: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.allow_tf32 = True
    assert apply_deterministic_settings(torch.device("cpu"), True) == {}
    assert not torch.are_deterministic_algorithms_enabled()  # the CPU is left alone
    assert torch.backends.cudnn.allow_tf32
    applied = apply_deterministic_settings(torch.device("cuda", 0), True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert applied["deterministic_algorithms"] is True
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own value is kept
    apply_deterministic_settings(torch.device("cuda"), False)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic


class Corrupted:
    """``tasks`` with task ``bad`` damaged by ``damage`` (thread-safe like ``tasks``)."""

    def __init__(self, tasks: FewShotTasks, bad: int, damage) -> None:  # noqa: ANN001
        self.tasks, self.bad, self.damage = tasks, bad, damage
        self.thread_safe = tasks.thread_safe

    def __getitem__(self, index: int) -> Task:
        task = self.tasks[index]
        return Task(*self.damage(*task)) if index == self.bad else task


def _nan_query(sx, sy, qx, qy):  # noqa: ANN001, ANN202
    qx = qx.clone()
    qx[1, 0, 0, 0] = float("nan")
    return sx, sy, qx, qy


DAMAGES = {
    "nan": ("maml", _nan_query, r"query_inputs holds 1 non-finite value\(s\)"),
    "out of range": ("adml", lambda sx, sy, qx, qy: (sx * 2 + 0.5, sy, qx, qy),
                     r"support_inputs lie in .* outside the attack's data_range"),
    "bad label": ("maml-ad", lambda sx, sy, qx, qy: (sx, sy, qx, qy + 1),
                  r"query_labels must lie in \[0, 3\)"),
}  # fmt: skip


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize(("workers", "prefetch"), [(0, 0), (0, 2), (1, 1)])
def test_a_bad_task_is_refused_by_the_pipeline_and_keeps_the_runs_files(
    tmp_path: Path, damage: str, workers: int, prefetch: int
) -> None:
    """Value checks run where meta-batches are built (in place, in the thread, in a worker):
    task 5 (iteration 2's second task) is refused with meta_step's message, naming it, and
    the checkpoint of iteration 2 and the logs stay as they were."""
    method, damaged, message = DAMAGES[damage]
    digits = FewShotTasks(Digits("train", image_size=16), 3, 1, 2, seed=0)
    config = digits_config(workers=workers, prefetch=prefetch)
    config["method"] = method
    config["train"]["eps"] = 8.0
    config["train"]["iterations"] = 2
    train(config, tmp_path, Corrupted(digits, 5, damaged), progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    config["train"]["iterations"] = 6
    expected = rf"training task 5: {message}"
    with pytest.raises(ValueError, match=expected):
        train(config, tmp_path, Corrupted(digits, 5, damaged), resume=True, progress=False)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert after == before


def test_value_checks_are_switched_per_thread() -> None:
    """The loop turns value checks off while the prefetch thread checks the next batches."""
    seen = []
    with value_checks(False):
        worker = threading.Thread(target=lambda: seen.append(value_checks_enabled()))
        worker.start()
        worker.join()
        seen.append(value_checks_enabled())
    assert seen == [True, False] and value_checks_enabled()
