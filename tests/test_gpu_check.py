"""scripts/gpu_check.py runs: without CUDA it exits 0 at once; on the CPU at a tiny size it
writes its JSON and Markdown with a row for every method and engine and passes its checks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from l2l_adversarial.app.benchmark import BENCHMARK_METHODS

pytest.importorskip("benchmarks.op_counter", reason="the op counter of issue 11")

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def _gpu_check():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so_and_exits_0(tmp_path: Path) -> None:
    environment = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, env=environment, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
    assert not (tmp_path / "out").exists()  # nothing measured, nothing written
    # ... before importing the package and the benchmarks (what takes seconds): torch only
    probe = (
        "import runpy, sys\n"
        f"sys.argv = [{str(SCRIPT)!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as stop:\n"
        "    loaded = [m for m in sys.modules if m.split('.')[0] in ('l2l_adversarial', "
        "'benchmarks', 'learn2learn')]\n"
        "    print('exit', stop.code, loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=environment, timeout=300, check=False)  # fmt: skip
    assert done.stdout.splitlines()[-1] == "exit 0 []", done.stdout + done.stderr


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert _gpu_check().main(["--device", "cpu", "--shots", "3"]) == 2
    assert "error: gpu_check arguments" in capsys.readouterr().err


def test_quick_cpu_run_writes_the_results_and_passes_its_checks(tmp_path: Path) -> None:
    arguments = ["--device", "cpu", "--quick", "--warmup", "1", "--iterations", "1",
                 "--eval-tasks", "1", "--shots", "1", "--tables", "3",
                 "--benchmarks", "cifar-fs-5w1s",
                 "--output", str(tmp_path)]  # fmt: skip
    assert _gpu_check().main(arguments) == 0
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    rows = {(row["method"], row["engine"]) for row in result["meta_iterations"]}
    assert ("learn2learn MAML loop", "-") in rows and ("Matching Nets", "sequential") in rows
    for method in ("MAML", "MAML-AD", "ADML", "ADML, sequential update", "Adversarial Querying"):
        assert {(method, "sequential"), (method, "vmap")} <= rows
    for row in result["meta_iterations"]:
        assert row["seconds_per_iteration"] > 0 and row["aten_ops"] > 0
        assert 0 <= row["data_wait_fraction"] <= 1
    checks = result["checks"]
    assert max(checks["vmap_minus_sequential_gradient"].values()) <= 1e-8
    assert checks["device_tasks_identical"] and all(checks["same_seed_same_parameters"].values())
    assert checks["evaluation_engines_agree"]
    assert {row["engine"] for row in result["evaluation"]} == {"sequential", "vmap"}
    for row in result["evaluation"]:
        # one chunk: the first task's labels, the chunk's value check, its results
        assert row["seconds_per_task"] > 0 and row["syncs_per_task"] * row["tasks"] == 3
    (estimate,) = result["table_estimates"]
    assert estimate["table"] == "Table 3" and estimate["hours"] > 0
    assert set(estimate["methods"]) == {"maml", "maml-ad", "adml", "matching-nets"}
    (benchmark,) = result["benchmark_estimates"]
    assert benchmark["table"] == "cifar-fs-5w1s" and benchmark["seeds"] == 3
    assert set(benchmark["methods"]) == set(BENCHMARK_METHODS)
    for part in benchmark["methods"].values():
        per_task, per_iteration = part["seconds_per_test_task"], part["seconds_per_iteration"]
        assert set(per_task) == {"paper", "literature"} and per_iteration > 0
        # 3 seeds x (60000 iterations + 600 paper tasks + 1000 literature tasks)
        expected = 3 * (60000 * per_iteration + 600 * per_task["paper"]
                        + 1000 * per_task["literature"]) / 3600  # fmt: skip
        assert part["hours"] == pytest.approx(expected)
    markdown = (tmp_path / "gpu-check.md").read_text()
    assert "| size | method | engine | s / iteration |" in markdown and "Table 3" in markdown
