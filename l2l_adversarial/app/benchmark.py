"""The benchmark: the robust meta-learners, each in its published attack placement (the bundled
``benchmark-<dataset>-5w<shots>s-<method>`` configs), trained with several seeds, every run
evaluated on the same seeded test tasks under the paper's protocol and the literature preset
(``evaluate.protocol: literature``), in one table with the spread across seeds and the paired
method comparisons of :mod:`~l2l_adversarial.app.seeds` (``examples/benchmark.py`` runs it).

Example:
    >>> benchmark_config("cifar-fs", 5, "aq")
    'benchmark-cifar-fs-5w5s-aq'
    >>> run_folder(Path("out"), "aq", 2).as_posix()
    'out/aq/seed-2'
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from l2l_adversarial.app.cli import main as cli
from l2l_adversarial.app.files import write_atomic
from l2l_adversarial.app.report import benchmark_json, format_benchmark, load_results
from l2l_adversarial.app.seeds import SEED_FOLDER
from l2l_adversarial.app.training import CHECKPOINT
from l2l_adversarial.evaluation import EvaluationResult

__all__ = [
    "BENCHMARK_DATASETS",
    "BENCHMARK_METHODS",
    "BENCHMARK_SEEDS",
    "PROTOCOL_RESULTS",
    "benchmark_config",
    "run_folder",
    "train_and_evaluate",
    "write_benchmark",
]

BENCHMARK_METHODS = {
    "maml": "MAML",
    "maml-ad": "MAML-AD",
    "adml": "ADML",
    "aq": "AQ",
    "r-maml-ce": "R-MAML (CE)",
    "r-maml-trades": "R-MAML (TRADES)",
}
"""The benchmark's configs by their method part, with the name each has in the table."""
BENCHMARK_DATASETS = ("mini-imagenet", "cifar-fs")
BENCHMARK_SEEDS = (0, 1, 2)
"""The training seeds of every method unless told otherwise."""
PROTOCOL_RESULTS = {
    "paper": ("evaluation.json", []),
    "literature": ("evaluation-literature.json", ["-o", "evaluate.protocol=literature"]),
}
"""Per protocol: the results file in every run folder and the ``evaluate`` flags giving it."""


def benchmark_config(dataset: str, shots: int, method: str) -> str:
    """The bundled config of ``method`` (a key of :data:`BENCHMARK_METHODS`) on ``dataset``."""
    return f"benchmark-{dataset}-5w{shots}s-{method}"


def run_folder(output: Path, method: str, seed: int | None) -> Path:
    """Where ``method`` trains with training seed ``seed`` (``None``: the config's) in
    ``output``."""
    return output / method if seed is None else output / method / SEED_FOLDER.format(seed)


def train_and_evaluate(
    config: str, run_dir: Path, flags: Sequence[str], evaluations: Mapping[str, Sequence[str]]
) -> int:
    """``l2l-adversarial train`` of ``config`` into ``run_dir`` (continuing the run there, a
    finished one included), then one ``evaluate`` per entry of ``evaluations`` (results file
    name in ``run_dir`` -> extra flags); ``flags`` go to every command. Returns the first
    non-zero exit status (a command's error, already printed), else 0."""
    resume = ["--resume"] if (run_dir / CHECKPOINT).exists() else []
    status = cli(["train", config, "--run-dir", str(run_dir), *resume, *flags])
    for name, extra in evaluations.items():
        if status:
            break
        status = cli(["evaluate", str(run_dir), "--overwrite", "--output", str(run_dir / name),
                      *flags, *extra])  # fmt: skip
    return status


def _results(
    output: Path, methods: Sequence[str], seeds: Sequence[int], name: str
) -> list[EvaluationResult]:
    """The results file ``name`` of every run, each named as in :data:`BENCHMARK_METHODS`
    (R-MAML's variants share a learner name)."""
    return [
        dataclasses.replace(result, method=BENCHMARK_METHODS[method])
        for method in methods
        for seed in seeds
        for result in load_results(run_folder(output, method, seed) / name)
    ]


def write_benchmark(
    output: str | os.PathLike[str], methods: Sequence[str], seeds: Sequence[int]
) -> list[Path]:
    """Write ``benchmark.md`` and ``benchmark.json`` into ``output`` from the results of every
    method's runs (:func:`run_folder`) under every protocol of :data:`PROTOCOL_RESULTS`;
    returns the two files."""
    folder = Path(output)
    results = {
        protocol: _results(folder, methods, seeds, name)
        for protocol, (name, _) in PROTOCOL_RESULTS.items()
    }
    table = benchmark_json(results)
    markdown = write_atomic(folder / "benchmark.md", format_benchmark(table))
    data = write_atomic(folder / "benchmark.json", json.dumps(table, indent=1, ensure_ascii=False))
    return [markdown, data]
