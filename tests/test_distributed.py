"""Meta-training and evaluation split over two CPU processes (gloo) against one process.

The two workers are forked once per module (a fork shares the parent's imports, so no
process pays for importing torch again) and run every distributed scenario; each test then
compares what they returned with the same computation done here in one process.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import os
import re
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from data_factories import SyntheticTasks, digits_config

from l2l_adversarial import CNN4, PGD
from l2l_adversarial.app.checkpoint import load_checkpoint
from l2l_adversarial.app.cli import main
from l2l_adversarial.app.training import CHECKPOINT, RunFolderError, Trainer, build_learner, train
from l2l_adversarial.distributed import (
    average_gradients,
    gather_strided,
    init_from_environment,
    mean_over_ranks,
    on_rank0,
    shutdown,
)
from l2l_adversarial.evaluation import GradientLearner, evaluate
from l2l_adversarial.task import Task

WORLD_SIZE = 2
TIMEOUT_S = 150  # the whole two-process run; it takes ~15 s on a busy 2-core machine
# spawn, not fork: earlier tests leave threads (tqdm's monitor, finished prefetch pools), and a
# child forked from a multi-threaded process can deadlock (Python 3.12 warns so; seen here as
# this fixture's timeout in full-suite runs, never when the file ran alone)
ONE_UPDATE = {
    "adml-joint": ("adml", {"attack": "ffgsm"}),  # random start: seeded per task index
    "adml-sequential": ("adml", {"meta_update": "sequential", "attack": "ffgsm"}),
    "maml": ("maml", {}),
}
RUN = ("adml", {"attack": "ffgsm", "iterations": 4})
CLI_OPTIONS = ["-o", "dataset.name=digits", "-o", "device=cpu", "-o", "model.hidden=4",
               "-o", "task.ways=3", "-o", "task.query_shots=2", "-o", "train.iterations=2",
               "-o", "train.meta_batch_size=2", "-o", "train.adaptation_steps=1",
               "-o", "evaluate.tasks=3", "-o", "evaluate.adaptation_steps=1", "--quiet"]  # fmt: skip


def config(method: str, **train_options: object) -> dict:
    return digits_config(method, **{"iterations": 1, "meta_batch_size": 4, **train_options})


def parameters(learner: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in learner.named_parameters()}


class Killed(Exception):
    """Stands in for the processes dying (no checkpoint is written on the way out)."""


def kill_at(iteration: int):  # noqa: ANN201
    def hook(current: int) -> None:
        if current == iteration:
            raise Killed()

    return hook


def evaluation_tasks() -> list[Task]:
    source = SyntheticTasks(seed=3, shots=2)
    return [source[i] for i in range(5)]  # 5 tasks: 3 on rank 0, 2 on rank 1


def evaluate_fresh_model() -> dict[str, Any]:
    torch.manual_seed(0)
    model = CNN4(ways=3, in_channels=1, hidden=4, image_size=16)
    result = evaluate(
        GradientLearner(model, lr=0.5, steps=2),
        evaluation_tasks(),
        method="MAML",
        epsilons=(2.0, 8.0),
        make_attack=functools.partial(PGD, steps=2),  # random start: seeded per task index
        protocol="adapted",
        seed=7,
    )
    return result.to_dict()


def record_writes_under(folder: Path, writes: list[str]) -> None:
    """Audit hook: note every file or folder created, written, renamed or removed in
    ``folder`` by this process, whatever code does it."""
    prefix = str(folder)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, Path)):
            path, mode, flags = args
            writing = (mode is None and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)) or (
                mode is not None and any(c in mode for c in "wax+")
            )
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.truncate"):
            path, writing = args[0], True
        else:
            return
        if writing and str(path).startswith(prefix):
            writes.append(f"{event} {path}")

    sys.addaudithook(hook)


def worker(rank: int, port: int, folder: Path) -> None:
    """One rank: every distributed scenario, results saved to ``folder/rank{rank}.pt``."""
    os.environ.update(WORLD_SIZE=str(WORLD_SIZE), RANK=str(rank), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    runs = folder / "runs"
    writes: list[str] = []
    if rank == 1:
        record_writes_under(runs, writes)
    out: dict[str, Any] = {"world": init_from_environment(timeout=timedelta(seconds=60))}

    grads = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    grads[0].grad = torch.full((2,), float(rank + 1))
    if rank == 1:
        grads[1].grad = torch.full((3,), 4.0)
    average_gradients(grads)
    out["averaged"] = [g.grad.clone() for g in grads if g.grad is not None]
    out["means"] = mean_over_ranks([rank, 10.0 * rank])
    out["gathered"] = gather_strided([10 * i for i in range(rank, 5, WORLD_SIZE)], 5)

    for name, (method, options) in ONE_UPDATE.items():
        learner = train(config(method, **options), runs / name, SyntheticTasks(), progress=False)
        out[name] = parameters(learner)

    method, options = RUN
    cfg = config(method, **options)
    out["run"] = parameters(train(cfg, runs / "run", SyntheticTasks(), progress=False))
    try:
        train(cfg, runs / "run", SyntheticTasks(), progress=False)
    except RunFolderError as error:
        out["refused"] = str(error)

    try:
        train(cfg, runs / "killed", SyntheticTasks(), progress=False, on_iteration=kill_at(3))
    except Killed:
        pass
    on_rank0(
        lambda: (folder / "killed-at-3").write_bytes((runs / "killed" / CHECKPOINT).read_bytes())
    )
    resumed = train(cfg, runs / "killed", SyntheticTasks(), resume=True, progress=False)
    out["resumed"] = parameters(resumed)

    out["evaluation"] = evaluate_fresh_model()
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        out["cli"] = [
            main(["train", "--run-dir", str(runs / "cli"), *CLI_OPTIONS]),
            main(["evaluate", str(runs / "cli"), *CLI_OPTIONS]),
        ]
        shutdown()
        # as under torchrun: the command joins the group from the environment, then leaves it
        again = ["--output", str(runs / "cli" / "again.json")]
        out["cli"].append(main(["evaluate", str(runs / "cli"), *again, *CLI_OPTIONS]))
        out["left_group"] = not torch.distributed.is_initialized()
    out["printed"] = printed.getvalue()
    out["writes"] = writes
    torch.save(out, folder / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    """What each of the two workers returned, and their folder."""
    folder = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(
        worker, args=(free_port(), folder), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the two workers did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    results = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    return results, folder


CANCELLED_BY_BATCHNORM = re.compile(r"features\.\d+\.0\.bias$")
"""CNN4's convolution biases: BatchNorm subtracts them again, so their gradient is zero up to
rounding, and Adam (which divides by the gradient's size) turns that rounding into steps."""


def assert_parameters_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    compared = [name for name in a if not CANCELLED_BY_BATCHNORM.search(name)]
    assert len(compared) == len(a) - 4  # the 4 convolution biases
    for name in compared:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)


def assert_same_on_both_ranks(ranks: list[dict[str, Any]], key: str) -> dict[str, torch.Tensor]:
    assert ranks[0][key].keys() == ranks[1][key].keys()
    for name, value in ranks[0][key].items():
        assert torch.equal(value, ranks[1][key][name]), f"{key}: ranks differ in {name}"
    return ranks[0][key]


def metrics(path: Path) -> list[tuple[int, float, float]]:
    with path.open() as file:
        return [(int(r["iteration"]), float(r["loss"]), float(r["accuracy"]))
                for r in csv.DictReader(file)]  # fmt: skip


def assert_results_close(a: Any, b: Any, where: str = "result") -> None:
    """Equal structure and text, numbers equal to floating-point tolerance."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_results_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_results_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-9), where
    else:
        assert a == b, where


# -- one process ---------------------------------------------------------------------------
def test_without_torchrun_everything_runs_in_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_from_environment() == (0, 1, None)
    assert not torch.distributed.is_initialized()
    assert gather_strided(["a", "b", "c"], 3) == ["a", "b", "c"]
    assert mean_over_ranks([1, 2.5]) == [1.0, 2.5]
    with pytest.raises(ValueError, match="one item per index"):
        gather_strided(["a"], 3)
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node=1
    assert init_from_environment() == (0, 1, None)


def test_incomplete_torchrun_environment_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(
        RuntimeError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set.*torchrun"
    ):
        init_from_environment()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' must be an integer"):
        init_from_environment()


def test_meta_batch_must_split_evenly_over_the_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("l2l_adversarial.app.training.world", lambda: (0, 2))  # as rank 0 of 2
    with pytest.raises(ValueError, match="meta_batch_size=3 must be a multiple of the number"):
        Trainer(config("maml", meta_batch_size=3), Path("unused"), SyntheticTasks(),
                torch.nn.Linear(2, 2), torch.device("cpu"))  # fmt: skip


# -- two processes -------------------------------------------------------------------------
def test_workers_joined_one_gloo_group_and_collectives_average(ranks: tuple) -> None:
    results, _ = ranks
    assert [r["world"] for r in results] == [(0, 2, None), (1, 2, None)]
    for result in results:
        assert torch.equal(result["averaged"][0], torch.full((2,), 1.5))  # (1 + 2) / 2
        assert torch.equal(result["averaged"][1], torch.full((3,), 2.0))  # (0 + 4) / 2
        assert result["means"] == [0.5, 5.0]
        assert result["gathered"] == [0, 10, 20, 30, 40]


@pytest.mark.parametrize("name", list(ONE_UPDATE))
def test_one_update_split_over_two_ranks_equals_whole_meta_batch(
    ranks: tuple, tmp_path: Path, name: str
) -> None:
    results, _ = ranks
    distributed = assert_same_on_both_ranks(results, name)
    method, options = ONE_UPDATE[name]
    cfg = config(method, **options)
    single = parameters(train(cfg, tmp_path / "single", SyntheticTasks(), progress=False))
    assert_parameters_close(distributed, single)
    torch.manual_seed(cfg["seed"])  # the initialisation every run starts from
    initial = parameters(build_learner(cfg, in_channels=1, image_size=16))
    assert not torch.allclose(initial["module.classifier.weight"],
                              distributed["module.classifier.weight"])  # fmt: skip


def test_training_run_equals_one_process_and_only_rank0_writes(
    ranks: tuple, tmp_path: Path
) -> None:
    results, folder = ranks
    distributed = assert_same_on_both_ranks(results, "run")
    method, options = RUN
    single = parameters(
        train(config(method, **options), tmp_path, SyntheticTasks(), progress=False)
    )
    assert_parameters_close(distributed, single)
    logged, expected = (
        metrics(folder / "runs" / "run" / "metrics.csv"),
        metrics(tmp_path / "metrics.csv"),
    )
    assert [row[0] for row in logged] == [1, 2, 3, 4]
    for got, want in zip(logged, expected, strict=True):  # means over all ranks, as in one process
        assert got == pytest.approx(want, rel=1e-5)
    assert {p.name for p in (folder / "runs" / "run").iterdir()} == {
        "config.yaml", "metrics.csv", "checkpoint.pt", "summary.json", ".lock"
    }  # fmt: skip
    assert results[1]["writes"] == []  # rank 1 created, wrote, renamed or removed nothing


def test_existing_run_is_refused_on_every_rank(ranks: tuple) -> None:
    results, _ = ranks
    for result in results:
        assert "already holds results" in result["refused"]


def test_distributed_resume_matches_uninterrupted_runs(ranks: tuple, tmp_path: Path) -> None:
    results, folder = ranks
    resumed = assert_same_on_both_ranks(results, "resumed")
    for name, value in resumed.items():  # same split, same order of operations: bit for bit
        assert torch.equal(value, results[0]["run"][name]), name
    killed = load_checkpoint(folder / "killed-at-3", kind="train")
    assert killed["iteration"] == 2
    # the two-process checkpoint resumed by one process ends where one process ends
    method, options = RUN
    cfg = config(method, **options)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CHECKPOINT).write_bytes((folder / "killed-at-3").read_bytes())
    single_resumed = parameters(
        train(cfg, tmp_path / "run", SyntheticTasks(), resume=True, progress=False)
    )
    single = parameters(train(cfg, tmp_path / "single", SyntheticTasks(), progress=False))
    assert_parameters_close(resumed, single)
    assert_parameters_close(single_resumed, single)


def test_distributed_evaluation_equals_one_process(ranks: tuple) -> None:
    results, _ = ranks
    single = evaluate_fresh_model()
    assert single["num_tasks"] == 5 and len(single["scenarios"]) == 12
    for result in results:  # every rank returns the whole result
        assert_results_close(result["evaluation"], single, "evaluation")


def test_command_line_under_two_processes(ranks: tuple, tmp_path: Path) -> None:
    results, folder = ranks
    assert [r["cli"] for r in results] == [[0, 0, 0], [0, 0, 0]]
    assert all(r["left_group"] for r in results)
    assert "trained adml" in results[0]["printed"] and "results:" in results[0]["printed"]
    assert results[1]["printed"] == ""  # only rank 0 prints
    assert main(["train", "--run-dir", str(tmp_path / "cli"), *CLI_OPTIONS]) == 0
    assert main(["evaluate", str(tmp_path / "cli"), *CLI_OPTIONS]) == 0
    got = json.loads((folder / "runs" / "cli" / "evaluation.json").read_text())
    want = json.loads((tmp_path / "cli" / "evaluation.json").read_text())
    assert_results_close(got, want, "evaluation.json")
    again = json.loads((folder / "runs" / "cli" / "again.json").read_text())
    assert_results_close(again, want, "again.json")
