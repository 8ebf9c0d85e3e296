"""One command for the day a GPU is lent: what a meta-iteration costs there, whether the
batched engine and the deterministic settings hold on CUDA, and how long each paper table of
``examples/reproduce.py`` and each table of ``examples/benchmark.py`` would take.

    make gpu-check                                   # CUDA, paper sizes; meant for <= 5 min
    python scripts/gpu_check.py --device cpu --quick # the same code at a tiny size (tests)

On a machine without CUDA, ``--device cuda`` (the default) says so and exits 0.

Measured, for 5-way 1-shot and 5-shot with 15 queries per class at 84 x 84 x 3 (``--quick``:
tiny images and model):

1. every method (MAML, MAML-AD, ADML joint and Algorithm 1's sequential update, Adversarial
   Querying, Matching Networks) with every engine it runs (sequential, vmap), and
   learn2learn's MAML loop (``benchmarks/test_meta_iteration.py``) on the same GPU: seconds
   per meta-iteration (median of the timed iterations, warm-up excluded, CUDA-synchronised),
   the ratio to learn2learn's MAML, peak CUDA memory, the fraction of the wall time spent
   waiting for tasks (device-resident tasks, built ahead as ``train`` builds them), and ATen
   operator calls and host-device synchronisations per meta-iteration
   (``benchmarks/op_counter.py``);
2. checks on the device: the vmap engine's meta-gradient equals the sequential one (float64,
   small model, every gradient-based method); device-resident tasks equal the host's, bit
   for bit; two ``train`` runs with the same seed under the deterministic settings
   (``l2l_adversarial.app.reproducibility``) end with identical parameters;
3. an estimate of each table's wall time (Tables 1-4: MAML, MAML-AD, ADML and Matching Nets
   trained for their configured iterations, then 600 test tasks at both eps), from short
   ``l2l-adversarial train`` and ``evaluate`` runs of the bundled configs on generated data
   (CIFAR-100's 32 x 32 images are stood in for by a generated cache of that size);
4. the same for each table of ``examples/benchmark.py`` (MiniImageNet and CIFAR-FS, 1 and 5
   shots): every benchmark method's config trained for its configured iterations with each of
   the default training seeds, evaluated under the paper's protocol (600 tasks) and the
   literature preset (1000 tasks, PGD-20 against the model after the last adaptation step).

Writes ``OUTPUT/gpu-check.json`` and ``OUTPUT/gpu-check.md`` (a table that ``scripts/docs_numbers.py --only gpu --gpu-check DIR`` copies into docs/performance.md).
Exit code 1 if a check fails, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import functools
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

TABLES = {  # table: (config dataset, shots, image side)
    "Table 1": ("mini-imagenet", 1, 84),
    "Table 2": ("mini-imagenet", 5, 84),
    "Table 3": ("cifar100", 1, 32),
    "Table 4": ("cifar100", 5, 32),
}
BENCHMARKS = {  # examples/benchmark.py's tables: (dataset, shots)
    f"{dataset}-5w{shots}s": (dataset, shots)
    for dataset in ("mini-imagenet", "cifar-fs")
    for shots in (1, 5)
}


def parse_arguments(argv: list[str] | None) -> argparse.Namespace | None:
    """The command line, or ``None`` (after saying why) when it is not valid."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="tiny images and model (tests)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed meta-iterations")
    parser.add_argument("--iterations", type=int, default=5, help="timed meta-iterations")
    parser.add_argument("--eval-tasks", type=int, default=6, help="test tasks per estimate")
    parser.add_argument("--shots", default="1,5", help="shot settings to time (default 1,5)")
    parser.add_argument("--tables", default=",".join(t.split()[1] for t in TABLES),
                        help="tables to estimate, by number (default 1,2,3,4)")  # fmt: skip
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS),
                        help=f"benchmark tables to estimate (default {','.join(BENCHMARKS)}; "
                        "'' for none)")  # fmt: skip
    parser.add_argument("--output", default="gpu-check", help="folder for the JSON and Markdown")
    args = parser.parse_args(argv)
    args.shots = tuple(int(s) for s in args.shots.split(",") if s.strip().isdigit())
    args.tables = tuple(f"Table {t.strip()}" for t in args.tables.split(",") if t.strip())
    args.benchmarks = tuple(b.strip() for b in args.benchmarks.split(",") if b.strip())
    if (
        args.device not in ("cuda", "cpu")
        or min(args.warmup, args.iterations, args.eval_tasks) < 1
        or not args.shots
        or not set(args.shots) <= {1, 5}
        or not set(args.tables) <= set(TABLES)
        or not set(args.benchmarks) <= set(BENCHMARKS)
    ):
        print("error: gpu_check arguments: --device is cuda or cpu, --warmup, --iterations and "
              "--eval-tasks are >= 1, --shots lists 1 and/or 5, --tables lists 1-4, --benchmarks "
              f"some of {','.join(BENCHMARKS)} (e.g. --device cuda --shots 1,5 --tables 1,2,3,4)", file=sys.stderr)  # fmt: skip
        return None
    return args


def no_cuda_to_measure(args: argparse.Namespace) -> bool:
    """Whether CUDA was asked for on a machine without it (then say so: nothing to do)."""
    if args.device != "cuda" or torch.cuda.is_available():
        return False
    print("gpu-check: no CUDA device on this machine (torch.cuda.is_available() is False): "
          "nothing measured. Run `make gpu-check` where a GPU is, or --device cpu --quick.")  # fmt: skip
    return True


if __name__ == "__main__":  # without CUDA, answer before importing the package (seconds)
    _arguments = parse_arguments(sys.argv[1:])
    if _arguments is None:
        sys.exit(2)
    if no_cuda_to_measure(_arguments):
        sys.exit(0)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the benchmarks package and this checkout's l2l_adversarial

from benchmarks.conftest import SIZES, Size, Workload  # noqa: E402
from benchmarks.op_counter import OpCounter  # noqa: E402
from benchmarks.test_data_pipeline import write_generated_cache  # noqa: E402
from benchmarks.test_meta_iteration import maml_reference  # noqa: E402
from l2l_adversarial import CNN4, FGSM, PGD, engines  # noqa: E402
from l2l_adversarial.app.benchmark import (  # noqa: E402
    BENCHMARK_METHODS,
    BENCHMARK_SEEDS,
    PROTOCOL_RESULTS,
    benchmark_config,
)
from l2l_adversarial.app.checkpoint import load_checkpoint  # noqa: E402
from l2l_adversarial.app.cli import main as cli  # noqa: E402
from l2l_adversarial.app.config import load_config  # noqa: E402
from l2l_adversarial.app.configs import config_path  # noqa: E402
from l2l_adversarial.app.factory import build_learner  # noqa: E402
from l2l_adversarial.app.reproducibility import apply_deterministic_settings  # noqa: E402
from l2l_adversarial.data import FewShotTasks, MiniImageNet  # noqa: E402
from l2l_adversarial.data.prefetch import MetaBatches, default_loading  # noqa: E402
from l2l_adversarial.evaluation import GradientLearner, evaluate, few_shot_learner  # noqa: E402

PAPER_METHODS = ("maml", "maml-ad", "adml", "matching-nets")
ROWS = [  # (label, method, config overrides)
    ("MAML", "maml", []),
    ("MAML-AD", "maml-ad", []),
    ("ADML", "adml", []),
    ("ADML, sequential update", "adml", ["train.meta_update=sequential"]),
    ("Adversarial Querying", "aq", []),
    ("Matching Nets", "matching-nets", []),
]
QUICK = ["model.hidden=4", "task.query_shots=2", "train.adaptation_steps=1",
         "evaluate.adaptation_steps=1"]  # fmt: skip


@dataclasses.dataclass
class Plan:
    device: torch.device
    quick: bool
    warmup: int
    iterations: int
    eval_tasks: int
    shots: tuple[int, ...] = (1, 5)
    tables: tuple[str, ...] = tuple(TABLES)
    benchmarks: tuple[str, ...] = tuple(BENCHMARKS)

    def size(self, shots: int) -> Size:
        if self.quick:
            return dataclasses.replace(SIZES["tiny"], ways=5, shots=shots, channels=3, meta_batch=4)
        return SIZES[f"paper-{shots}shot"]

    def image(self, side: int) -> int:
        return 16 if self.quick else side


def say(message: str) -> None:
    """Progress on stderr (the results go to stdout and the files)."""
    print(f"gpu-check: {message}", file=sys.stderr, flush=True)


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(
    plan: Plan, iteration: Callable[[], float]
) -> tuple[float, float, float | None, tuple[int, int]]:
    """(median s/iteration, data-wait fraction, peak CUDA MB, (ATen ops, syncs) of one
    iteration); ``iteration`` returns the seconds it waited for data."""
    for _ in range(plan.warmup):
        iteration()
    synchronise(plan.device)
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(plan.device)
    seconds, waits = [], []
    for _ in range(plan.iterations):
        start = time.perf_counter()
        waits.append(iteration())
        synchronise(plan.device)
        seconds.append(time.perf_counter() - start)
    peak = None
    if plan.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(plan.device) / 2**20
    with OpCounter() as counter:
        iteration()
        synchronise(plan.device)
    return statistics.median(seconds), sum(waits) / sum(seconds), peak, (counter.ops, counter.syncs)


def row_config(method: str, shots: int, overrides: list[str], plan: Plan, root: Path) -> dict:
    dataset = "mini-imagenet"
    return load_config(
        config_path(f"{dataset}-5w{shots}s-{method}"),
        [f"dataset.root={root}", "dataset.strict=false", "dataset.device_resident=true",
         f"device={plan.device}", *overrides, *(QUICK if plan.quick else [])],
    )  # fmt: skip


def meta_iteration_rows(plan: Plan, root: Path) -> list[dict[str, Any]]:
    """Item 1 of the module doc, for both shot settings."""
    rows: list[dict[str, Any]] = []
    dataset = MiniImageNet(root, "train", strict=False)
    for shots in plan.shots:
        size = plan.size(shots)
        workload = Workload(dataclasses.replace(size, channels=3), plan.device)
        reference = maml_reference(workload)

        def reference_iteration(reference: Callable[[], None] = reference) -> float:
            reference()
            return 0.0

        say(f"{shots}-shot: learn2learn's MAML loop")
        median, _, peak, counts = timed(plan, reference_iteration)
        reference_seconds = median
        rows.append(_row(size, "learn2learn MAML loop", "-", median, 1.0, peak, 0.0, counts))
        for label, method, overrides in ROWS:
            config = row_config(method, shots, overrides, plan, root)
            task = config["task"]
            tasks = FewShotTasks(dataset, task["ways"], task["shots"], task["query_shots"],
                                 seed=0, device=plan.device)  # fmt: skip
            for engine in ("sequential", "vmap"):
                if method == "matching-nets" and engine == "vmap":
                    continue
                say(f"{shots}-shot: {label}, {engine}")
                torch.manual_seed(0)
                learner = build_learner(config, 3, plan.image(84)).to(plan.device)
                train = config["train"]
                optimizers = [torch.optim.Adam(learner.parameters(), train["meta_lr"])]
                if train["meta_update"] == "sequential":
                    optimizers.append(torch.optim.Adam(learner.parameters(), train["meta_lr"]))
                workers, prefetch = default_loading(tasks, plan.device)
                batch = train["meta_batch_size"]
                batches = iter(MetaBatches(
                    tasks, lambda it, b=batch: range(it * b, (it + 1) * b), 0, 10**6,
                    device=plan.device, workers=workers, prefetch=prefetch,
                ))  # fmt: skip

                def iteration(batches: Iterator = batches, learner: Any = learner,
                              optimizers: list = optimizers, engine: str = engine) -> float:  # fmt: skip
                    start = time.perf_counter()
                    meta_batch = [task for _, task in next(batches)]
                    waited = time.perf_counter() - start
                    engines.meta_step(learner, meta_batch, *optimizers, engine=engine)
                    return waited

                median, wait, peak, counts = timed(plan, iteration)
                batches.close()  # type: ignore[attr-defined]
                ratio = median / reference_seconds
                rows.append(_row(size, label, engine, median, ratio, peak, wait, counts))
    return rows


def _row(size: Size, label: str, engine: str, seconds: float, ratio: float,
         peak: float | None, wait: float, counts: tuple[int, int]) -> dict[str, Any]:  # fmt: skip
    return {"size": f"5-way {size.shots}-shot, {size.image}x{size.image}", "method": label,
            "engine": engine, "seconds_per_iteration": seconds, "x_learn2learn_maml": ratio,
            "peak_cuda_mb": peak, "data_wait_fraction": wait, "aten_ops": counts[0],
            "syncs": counts[1]}  # fmt: skip


def check_gradients(plan: Plan, root: Path) -> dict[str, float]:
    """Largest |vmap - sequential| meta-gradient entry per method (float64, small model)."""
    differences = {}
    dataset = MiniImageNet(root, "train", strict=False)
    small = ["model.hidden=4", "task.query_shots=2", "train.adaptation_steps=2"]
    for label, method, overrides in ROWS:
        if method == "matching-nets":
            continue
        config = row_config(method, 1, [*overrides, *small], plan, root)
        tasks = FewShotTasks(dataset, 5, 1, 2, seed=1, device=plan.device)
        meta_batch = [task._replace(support_inputs=task.support_inputs.double(),
                                    query_inputs=task.query_inputs.double())
                      for task in (tasks[0], tasks[1])]  # fmt: skip
        gradients = []
        for engine in ("sequential", "vmap"):
            torch.manual_seed(0)
            learner = build_learner(config, 3, plan.image(84)).to(plan.device).double()
            optimizers = [torch.optim.SGD(learner.parameters(), lr=0.0)]
            if config["train"]["meta_update"] == "sequential":
                optimizers.append(torch.optim.SGD(learner.parameters(), lr=0.0))
            engines.meta_step(learner, meta_batch, *optimizers, engine=engine)
            gradients.append(torch.cat([p.grad.flatten() for p in learner.parameters()]))
        differences[label] = float((gradients[0] - gradients[1]).abs().max())
    return differences


def evaluation_rows(plan: Plan, root: Path) -> list[dict[str, Any]]:
    """Seconds, peak CUDA memory and syncs per test task of ``evaluate`` (ADML's learner, the
    paper's 10 steps and scenarios, eps 2 and 0.2) on each engine, a chunk of
    ``--eval-tasks`` tasks (device-resident, built a chunk ahead)."""
    rows = []
    dataset = MiniImageNet(root, "test", strict=False)
    for shots in plan.shots:
        config = row_config("adml", shots, [], plan, root)
        settings = config["evaluate"]
        tasks = FewShotTasks(dataset, 5, shots, config["task"]["query_shots"], seed=2,
                             num_tasks=plan.eval_tasks, device=plan.device)  # fmt: skip
        torch.manual_seed(0)
        learner = few_shot_learner(build_learner(config, 3, plan.image(84)).to(plan.device),
                                   settings["inner_lr"], settings["adaptation_steps"])  # fmt: skip
        for engine in ("sequential", "vmap"):
            say(f"{shots}-shot: evaluate, {engine}")

            run = functools.partial(evaluate, learner, tasks, method="ADML", engine=engine,
                                    epsilons=settings["eps"], chunk_size=plan.eval_tasks,
                                    device=plan.device)  # fmt: skip

            def evaluation(run: Callable[[], object] = run) -> float:
                run()
                return 0.0

            median, _, peak, (ops, syncs) = timed(dataclasses.replace(plan, iterations=1),
                                                  evaluation)  # fmt: skip
            rows.append({"size": f"5-way {shots}-shot, {plan.image(84)}x{plan.image(84)}",
                         "engine": engine, "tasks": plan.eval_tasks,
                         "seconds_per_task": median / plan.eval_tasks, "peak_cuda_mb": peak,
                         "aten_ops_per_task": ops / plan.eval_tasks,
                         "syncs_per_task": syncs / plan.eval_tasks})  # fmt: skip
    return rows


def check_evaluation_engines(plan: Plan, root: Path) -> bool:
    """The vmap evaluator's per-task accuracies equal the sequential evaluator's (float64,
    small model; FGSM and PGD with seeded random starts, both protocols)."""
    dataset = MiniImageNet(root, "test", strict=False)
    tasks = FewShotTasks(dataset, 5, 5, 2, seed=4, num_tasks=3, device=plan.device)
    tasks64 = [task._replace(support_inputs=task.support_inputs.double(),
                             query_inputs=task.query_inputs.double())
               for task in (tasks[i] for i in range(len(tasks)))]  # fmt: skip
    torch.manual_seed(0)
    model = CNN4(5, 3, 4, plan.image(84)).to(plan.device).double()
    learner = GradientLearner(model, lr=0.1, steps=2)
    same = True
    for make_attack, protocol in ((FGSM, "paper"), (functools.partial(PGD, steps=3), "adapted")):
        results = [
            evaluate(
                learner,
                tasks64,
                method="MAML",
                epsilons=(8.0,),
                make_attack=make_attack,
                protocol=protocol,
                engine=engine,
                chunk_size=2,
            )  # fmt: skip
            for engine in ("sequential", "vmap")
        ]
        same &= all(a.task_accuracies == b.task_accuracies
                    for a, b in zip(*(r.scenarios for r in results), strict=True))  # fmt: skip
    return same


def check_device_tasks(plan: Plan, root: Path) -> bool:
    dataset = MiniImageNet(root, "train", strict=False)
    host = FewShotTasks(dataset, 5, 5, 15, seed=3)
    resident = FewShotTasks(dataset, 5, 5, 15, seed=3, device=plan.device)
    return all(
        torch.equal(a, b.cpu()) for index in range(4)
        for a, b in zip(host[index], resident[index], strict=True)
    )  # fmt: skip


def run_cli(arguments: list[str]) -> float:
    """Seconds one in-process ``l2l-adversarial`` command took; its output is swallowed."""
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        status = cli(arguments)
    synchronise(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    if status:
        raise RuntimeError(f"l2l-adversarial {' '.join(arguments)} exited with {status}")
    return time.perf_counter() - start


def cli_flags(config: Path, plan: Plan, root: Path, extra: list[str]) -> list[str]:
    overrides = ["dataset.name=mini-imagenet", f"dataset.root={root}", "dataset.strict=false",
                 "dataset.device_resident=true", f"device={plan.device}",
                 *(QUICK if plan.quick else []), *extra]  # fmt: skip
    return [str(config), *(flag for o in overrides for flag in ("-o", o))]


def check_determinism(plan: Plan, root: Path, work: Path) -> dict[str, bool]:
    """Two same-seed ``train`` runs per engine end with identical parameters."""
    identical = {}
    config = config_path("mini-imagenet-5w1s-adml")
    for engine in ("sequential", "vmap"):
        states = []
        for run in ("a", "b"):
            run_dir = work / f"deterministic-{engine}-{run}"
            flags = cli_flags(config, plan, root, ["train.iterations=3",
                                                   f"train.engine={engine}"])  # fmt: skip
            run_cli(["train", flags[0], "--run-dir", str(run_dir), "--quiet", *flags[1:]])
            states.append(load_checkpoint(run_dir / "checkpoint.pt", kind="train")["learner"])
        identical[engine] = all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    return identical


def estimate_method(
    plan: Plan,
    path: Path,
    root: Path,
    run_dir: Path,
    evaluations: dict[str, list[str]],
    seeds: int = 1,
) -> dict[str, Any]:
    """Configured iterations x measured s/iteration + configured tasks x measured s/task of
    every evaluation (name: its overrides), for ``seeds`` training seeds: short ``train`` and
    ``evaluate`` runs of the config at ``path``."""
    steps = plan.warmup + plan.iterations
    flags = cli_flags(path, plan, root, [f"train.iterations={steps}", "train.log_every=1",
                                         f"evaluate.tasks={plan.eval_tasks}"])  # fmt: skip
    run_cli(["train", flags[0], "--run-dir", str(run_dir), "--quiet", *flags[1:]])
    with (run_dir / "metrics.csv").open() as metrics:
        seconds = [float(row["seconds"]) for row in csv.DictReader(metrics)]
    per_iteration = (seconds[-1] - seconds[plan.warmup - 1]) / plan.iterations
    configured = load_config(path, [f"dataset.root={root}"])
    total = configured["train"]["iterations"] * per_iteration
    per_task = {}
    for name, overrides in evaluations.items():
        extra = [flag for override in overrides for flag in ("-o", override)]
        evaluation = run_cli(["evaluate", str(run_dir), "--quiet", "--overwrite", *flags[1:],
                              *extra])  # fmt: skip
        per_task[name] = evaluation / plan.eval_tasks
        tasks = load_config(path, [f"dataset.root={root}", *overrides])["evaluate"]["tasks"]
        total += tasks * per_task[name]
    return {"seconds_per_iteration": per_iteration, "seconds_per_test_task": per_task,
            "hours": seeds * total / 3600}  # fmt: skip


def estimate_tables(plan: Plan, roots: dict[int, Path], work: Path) -> list[dict[str, Any]]:
    """Item 3 of the module doc, summed over the paper's methods."""
    estimates = []
    for table in plan.tables:
        dataset, shots, side = TABLES[table]
        parts = {
            method: estimate_method(
                plan,
                config_path(f"{dataset}-5w{shots}s-{method}"),
                roots[side],
                work / f"{table.replace(' ', '')}-{method}",
                {"paper": []},
            )  # fmt: skip
            for method in PAPER_METHODS
        }
        estimates.append({"table": table, "dataset": dataset, "shots": shots,
                          "image": plan.image(side), "methods": parts,
                          "hours": sum(part["hours"] for part in parts.values())})  # fmt: skip
    return estimates


def estimate_benchmarks(plan: Plan, roots: dict[int, Path], work: Path) -> list[dict[str, Any]]:
    """Item 4 of the module doc: every method of ``examples/benchmark.py``, its default
    training seeds, both protocols."""
    evaluations = {name: [f"evaluate.protocol={name}"] for name in PROTOCOL_RESULTS}
    estimates = []
    for table in plan.benchmarks:
        dataset, shots = BENCHMARKS[table]
        side = 84 if dataset == "mini-imagenet" else 32
        parts = {
            method: estimate_method(
                plan,
                config_path(benchmark_config(dataset, shots, method)),
                roots[side],
                work / f"{table}-{method}",
                evaluations,
                seeds=len(BENCHMARK_SEEDS),
            )  # fmt: skip
            for method in BENCHMARK_METHODS
        }
        estimates.append({"table": table, "dataset": dataset, "shots": shots,
                          "image": plan.image(side), "seeds": len(BENCHMARK_SEEDS),
                          "methods": parts,
                          "hours": sum(part["hours"] for part in parts.values())})  # fmt: skip
    return estimates


def markdown(result: dict[str, Any]) -> str:
    lines = [f"`make gpu-check` on {result['device_name']} ({result['date']}, torch "
             f"{result['torch']}{', --quick' if result['quick'] else ''})", "",
             "| size | method | engine | s / iteration | x learn2learn MAML | peak CUDA MB | "
             "data wait | ATen ops | syncs |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in result["meta_iterations"]:
        peak = "-" if row["peak_cuda_mb"] is None else f"{row['peak_cuda_mb']:.0f}"
        lines.append(
            f"| {row['size']} | {row['method']} | {row['engine']} | "
            f"{row['seconds_per_iteration']:.4f} | {row['x_learn2learn_maml']:.2f} | {peak} | "
            f"{100 * row['data_wait_fraction']:.1f} % | {row['aten_ops']} | {row['syncs']} |"
        )
    lines += ["", "| evaluate (ADML, 10 steps, eps 2 and 0.2) | engine | s / test task | "
              "peak CUDA MB | ATen ops / task | syncs / task |", "|---|---|---|---|---|---|"]  # fmt: skip
    for row in result["evaluation"]:
        peak = "-" if row["peak_cuda_mb"] is None else f"{row['peak_cuda_mb']:.0f}"
        lines.append(f"| {row['size']}, chunk of {row['tasks']} | {row['engine']} | "
                     f"{row['seconds_per_task']:.4f} | {peak} | {row['aten_ops_per_task']:.0f} | "
                     f"{row['syncs_per_task']:.2f} |")  # fmt: skip
    checks = result["checks"]
    lines += ["", "| check | result |", "|---|---|"]
    for label, difference in checks["vmap_minus_sequential_gradient"].items():
        lines.append(f"| vmap == sequential meta-gradient (float64), {label} | "
                     f"max abs difference {difference:.1e} |")  # fmt: skip
    lines.append(
        "| vmap evaluator == sequential, task by task (float64) | "
        f"{checks['evaluation_engines_agree']} |"
    )
    lines.append(f"| device-resident tasks == host tasks | {checks['device_tasks_identical']} |")
    for engine, same in checks["same_seed_same_parameters"].items():
        lines.append(f"| two same-seed train runs, identical parameters ({engine}) | {same} |")
    lines += ["", "| table | estimated wall time (train + evaluate, 4 methods) |", "|---|---|"]
    for estimate in result["table_estimates"]:
        lines.append(f"| {estimate['table']} ({estimate['dataset']}, {estimate['shots']}-shot) "
                     f"| {estimate['hours']:.2f} h |")  # fmt: skip
    lines += ["", "| benchmark table | estimated wall time (train x seeds + evaluate, both "
              "protocols) |", "|---|---|"]  # fmt: skip
    for estimate in result["benchmark_estimates"]:
        lines.append(f"| {estimate['table']} ({len(estimate['methods'])} methods x "
                     f"{estimate['seeds']} seeds) | {estimate['hours']:.2f} h |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args is None:
        return 2
    if no_cuda_to_measure(args):
        return 0
    shots, tables = args.shots, args.tables
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    plan = Plan(device, args.quick, args.warmup, args.iterations, args.eval_tasks, shots, tables,
                args.benchmarks)  # fmt: skip
    settings = apply_deterministic_settings(device, True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as temporary:
        work = Path(temporary)
        roots = {}
        for side in (84, 32):
            roots[side] = work / f"data-{side}"
            for mode, classes in (("train", 64), ("validation", 16), ("test", 20)):
                write_generated_cache(roots[side], mode, plan.image(side), classes, 40)
        result: dict[str, Any] = {
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()})",
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "torch": torch.__version__,
            "cuda": torch.version.cuda, "quick": plan.quick, "deterministic_settings": settings,
            "warmup": plan.warmup, "timed_iterations": plan.iterations,
        }  # fmt: skip
        result["meta_iterations"] = meta_iteration_rows(plan, roots[84])
        result["evaluation"] = evaluation_rows(plan, roots[84])
        say("checks: gradients, evaluation engines, device-resident tasks, same-seed runs")
        result["checks"] = {
            "vmap_minus_sequential_gradient": check_gradients(plan, roots[84]),
            "evaluation_engines_agree": check_evaluation_engines(plan, roots[84]),
            "device_tasks_identical": check_device_tasks(plan, roots[84]),
            "same_seed_same_parameters": check_determinism(plan, roots[84], work),
        }
        say("table estimates: short train and evaluate runs of the shipped configs")
        result["table_estimates"] = estimate_tables(plan, roots, work)
        say("benchmark estimates: short train and evaluate runs of the benchmark configs")
        result["benchmark_estimates"] = estimate_benchmarks(plan, roots, work)
    result["seconds"] = time.perf_counter() - started
    return report(result, Path(args.output))


def report(result: dict[str, Any], output: Path) -> int:
    """Write and print the results; 0 if every check passed, else 1."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "gpu-check.json").write_text(json.dumps(result, indent=2))
    (output / "gpu-check.md").write_text(markdown(result))
    print(markdown(result))
    checks = result["checks"]
    passed = (
        all(d <= 1e-8 for d in checks["vmap_minus_sequential_gradient"].values())
        and checks["evaluation_engines_agree"]
        and checks["device_tasks_identical"]
        and all(checks["same_seed_same_parameters"].values())
    )
    print(f"gpu-check: {'all checks passed' if passed else 'A CHECK FAILED'} in "
          f"{result['seconds']:.0f} s; wrote {output / 'gpu-check.json'} and .md")  # fmt: skip
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
