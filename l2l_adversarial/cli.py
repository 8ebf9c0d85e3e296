"""Command line: ``l2l-adversarial {train,evaluate,report,quickstart}`` (also ``python -m
l2l_adversarial``).

Example:
    l2l-adversarial train examples/configs/mini-imagenet-5w1s-adml.yaml -o dataset.root=~/data
    l2l-adversarial evaluate runs/mini-imagenet-5w1s-adml
    l2l-adversarial report runs/*/evaluation.json --output report/
    l2l-adversarial quickstart
    torchrun --standalone --nproc_per_node=2 -m l2l_adversarial train CONFIG   # 2 processes
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from l2l_adversarial.attacks import FGSM, PGD, Attack
from l2l_adversarial.autoattack import AutoAttack
from l2l_adversarial.checkpoint import CheckpointError, load_checkpoint
from l2l_adversarial.config import BUNDLED_DATASETS, ConfigError, load_config
from l2l_adversarial.data import DatasetDownloadError, DatasetFileError, make_tasks
from l2l_adversarial.distributed import (
    init_from_environment,
    is_distributed,
    rank_indices,
    shutdown,
    world,
)
from l2l_adversarial.evaluation import EvaluationResult, evaluate, few_shot_learner
from l2l_adversarial.meta_validation import BEST_CHECKPOINT, MetaValidator
from l2l_adversarial.report import (
    format_compact_table,
    format_table,
    load_results,
    save_results,
    write_atomic,
    write_report,
)
from l2l_adversarial.training import (
    CHECKPOINT,
    RunFolderError,
    build_learner,
    resolve_device,
    train,
)

__all__ = ["main"]

DATASET_TITLES = {
    "mini-imagenet": "MiniImageNet",
    "cifar100": "CIFAR100",
    "cifar-fs": "CIFAR-FS",
    "digits": "Digits",
}
DISTRIBUTED_COMMANDS = ("train", "evaluate")
"""Commands that split their work over the processes of a torchrun launch."""
METHOD_NAMES = {
    "maml": "MAML",
    "maml-ad": "MAML-AD",
    "adml": "ADML",
    "aq": "AQ",
    "matching-nets": "Matching Nets",
}


def default_run_dir(config: dict[str, Any]) -> Path:
    task = config["task"]
    name = f"{config['dataset']['name']}-{task['ways']}w{task['shots']}s-{config['method']}"
    return Path(config["run_dir"] or Path("runs") / name)


def task_source(config: dict[str, Any], mode: str, seed: int, num_tasks: int = -1) -> Any:
    dataset, task = config["dataset"], config["task"]
    options: dict[str, Any] = {"strict": dataset["strict"]}
    if dataset["name"] in BUNDLED_DATASETS:
        options = {} if dataset["image_size"] is None else {"image_size": dataset["image_size"]}
    return make_tasks(
        dataset["name"],
        dataset["root"],
        mode,
        task["ways"],
        task["shots"],
        task["query_shots"],
        seed=seed,
        num_tasks=num_tasks,
        download=dataset["download"],
        **options,
    )


CHECKPOINTS = {"last": CHECKPOINT, "best": BEST_CHECKPOINT}
"""``evaluate --checkpoint``: the last checkpoint, or the best one of meta-validation."""


def validation_monitor(
    config: dict[str, Any], epsilons: Sequence[float] = ()
) -> MetaValidator | None:
    """Meta-validation (and TensorBoard) for a run, on ``train.validation_tasks`` seeded tasks
    of the validation split (of the meta-training split for digits, which has none)."""
    train = config["train"]
    if train["validate_every"] is None and not train["tensorboard"]:
        return None
    split = "train" if config["dataset"]["name"] in BUNDLED_DATASETS else "validation"
    tasks = task_source(
        config, split, seed=config["evaluate"]["seed"], num_tasks=train["validation_tasks"]
    )
    return MetaValidator(config, tasks, split=split, epsilons=epsilons)


def load_trained_learner(
    run_dir: Path, config: dict[str, Any], tasks: Any, checkpoint: str = "last"
) -> nn.Module:
    """The learner of a finished (or interrupted) run, at its last or its best checkpoint."""
    path = run_dir / CHECKPOINTS[checkpoint]
    if checkpoint == "best" and not path.exists():
        raise CheckpointError(
            f"{str(path)!r} not found: the run kept no best checkpoint (train.validate_every "
            "was null, or it stopped before its first validation); use --checkpoint last"
        )
    state = load_checkpoint(path, kind="train", expected={"method": config["method"]})
    shape = tasks[0].support_inputs.shape
    learner = build_learner(config, shape[1], shape[-1])
    learner.load_state_dict(state["learner"])
    return learner


def evaluation_attack(settings: dict[str, Any]) -> Callable[[float], Attack]:
    """``evaluate.attack`` as a function of the radius: FGSM, PGD (``pgd_steps``, step
    ``pgd_step_size`` pixel levels) or torchattacks' AutoAttack."""
    if settings["attack"] == "pgd":
        step = settings["pgd_step_size"]
        return functools.partial(
            PGD, steps=settings["pgd_steps"], step_size=None if step is None else step / 255
        )
    return AutoAttack if settings["attack"] == "autoattack" else FGSM


def evaluate_run(
    run_dir: Path, config: dict[str, Any], progress: bool = True, checkpoint: str = "last"
) -> EvaluationResult:
    """Evaluate a trained run on the seeded test tasks in the paper's scenarios."""
    settings = config["evaluate"]
    tasks = task_source(config, "test", seed=settings["seed"], num_tasks=settings["tasks"])
    learner = load_trained_learner(run_dir, config, tasks, checkpoint)
    device = resolve_device(config["device"])
    with tqdm(
        total=len(rank_indices(len(tasks))),
        desc=f"evaluate {config['method']}",
        disable=not progress or world()[0] != 0,
        dynamic_ncols=True,
    ) as bar:
        return evaluate(
            few_shot_learner(
                learner.to(device), settings["inner_lr"], settings["adaptation_steps"]
            ),
            tasks,
            method=METHOD_NAMES[config["method"]],
            epsilons=settings["eps"],
            make_attack=evaluation_attack(settings),
            protocol=settings["protocol"],
            seed=settings["seed"],
            dataset=DATASET_TITLES[config["dataset"]["name"]],
            device=device,
            progress=bar,
        )


def _refuse_overwrite(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise RunFolderError(f"{str(path)!r} already exists; pass --overwrite to replace it")


def command_train(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config)
    tasks = task_source(config, "train", seed=config["seed"])
    train(
        config,
        run_dir,
        tasks,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
        monitor=validation_monitor(config),
    )
    if world()[0] == 0:
        print(f"trained {config['method']}: {run_dir}")
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunFolderError(f"{str(run_dir)!r} is not a run folder (no config.yaml); train first")
    config = load_config(run_dir / "config.yaml", args.set)
    default = "evaluation.json" if args.checkpoint == "last" else "evaluation_best.json"
    output = Path(args.output) if args.output else run_dir / default
    _refuse_overwrite(output, args.overwrite)
    result = evaluate_run(run_dir, config, progress=not args.quiet, checkpoint=args.checkpoint)
    if world()[0] == 0:
        save_results([result], output)
        print(format_table([result], result.dataset or config["dataset"]["name"], result.shots))
        print(f"results: {output}")
    return 0


def command_report(args: argparse.Namespace) -> int:
    groups: dict[tuple[str, int], list[EvaluationResult]] = defaultdict(list)
    runs: dict[tuple[str, int], dict[str, Path]] = defaultdict(dict)
    for path in map(Path, args.results):
        for result in load_results(path):
            key = (result.dataset or "unknown", result.shots)
            groups[key].append(result)
            if (path.parent / "metrics.csv").is_file():  # results inside a run folder
                runs[key][result.method] = path.parent
    for (dataset, shots), group in sorted(groups.items()):
        print(format_table(group, dataset, shots))
        paths = write_report(group, args.output, dataset, shots, epsilon=args.epsilon,
                             training_runs=runs[dataset, shots])  # fmt: skip
        for path in paths:
            print(f"wrote {path}")
    return 0


QUICKSTART = [
    "dataset.name=digits",
    "dataset.image_size=16",
    "task.ways=5",
    "task.shots=5",  # five shots, so all six scenarios (40% included) exist
    "task.query_shots=5",
    "model.hidden=16",
    "train.meta_batch_size=2",
    "train.meta_lr=0.003",
    "train.adaptation_steps=5",
    "train.checkpoint_every=50",
    "train.validate_every=20",
    "train.validation_tasks=10",
    "evaluate.adaptation_steps=10",
]
QUICKSTART_METHODS = ("maml", "maml-ad", "adml")
QUICKSTART_ITERATIONS, QUICKSTART_TASKS = 60, 40
QUICKSTART_RADII = (2.0, 4.0, 8.0, 16.0, 32.0)
"""Candidate radii (pixel levels): the rule picks one; the robustness curves use them all."""
EPS_RULE_RATIO = 0.9
"""The quickstart's radius: the smallest candidate at which FGSM brings MAML's Clean-Adversarial
accuracy below this fraction of its Clean-Clean accuracy, on its final meta-validation."""


def choose_epsilon(validation_csv: Path) -> tuple[float, dict[str, Any]]:
    """Apply the quickstart's rule to MAML's last meta-validation (``validation.csv``): the
    smallest radius whose adversarial accuracy is below ``EPS_RULE_RATIO`` x the clean one
    (the largest radius if none is). Returns the radius and the row it was read from."""
    rows = list(csv.DictReader(validation_csv.open(newline="")))
    if not rows:
        raise RunFolderError(f"{str(validation_csv)!r} is empty: train MAML again (--overwrite)")
    last = max(int(r["iteration"]) for r in rows)
    final = sorted(
        (r for r in rows if int(r["iteration"]) == last), key=lambda r: float(r["epsilon"])
    )
    for row in final:
        if float(row["adversarial_accuracy"]) < EPS_RULE_RATIO * float(row["clean_accuracy"]):
            return float(row["epsilon"]), row
    return float(final[-1]["epsilon"]), final[-1]


def command_quickstart(args: argparse.Namespace) -> int:
    """Train MAML, pick the radius at which FGSM breaks it, train MAML-AD and ADML at that
    radius, evaluate all three on the same seeded digits tasks, print the table, write the
    figures."""
    # A tiny model: one intra-op thread is fastest (two measured 2-15x slower on a 2-core VM).
    torch.set_num_threads(1)
    output = Path(args.output)
    started, cpu_started = time.perf_counter(), time.process_time()
    epsilon: float | None = None
    rule: dict[str, Any] = {}
    results, runs = [], {}
    for method in QUICKSTART_METHODS:
        overrides = [*QUICKSTART, f"method={method}", f"train.iterations={args.iterations}",
                     f"evaluate.tasks={args.tasks}", f"seed={args.seed}",
                     f"evaluate.eps={list(QUICKSTART_RADII)}"]  # fmt: skip
        if epsilon is not None:
            overrides.append(f"train.eps={epsilon}")
        config = load_config(None, [*overrides, *args.set])
        run_dir = output / method
        if args.overwrite or not (run_dir / CHECKPOINT).exists():
            radii = QUICKSTART_RADII if method == "maml" else ()
            train(config, run_dir, task_source(config, "train", seed=config["seed"]),
                  overwrite=args.overwrite, progress=not args.quiet,
                  monitor=validation_monitor(config, radii))  # fmt: skip
        if method == "maml":
            epsilon, rule = choose_epsilon(run_dir / "validation.csv")
        runs[METHOD_NAMES[method]] = run_dir
        results.append(evaluate_run(run_dir, config, progress=not args.quiet))
    assert epsilon is not None
    save_results(results, output / "evaluation.json")
    report = write_report(results, output / "report", "Digits", results[0].shots,
                          epsilon=epsilon, training_runs=runs)  # fmt: skip
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    summary = {"epsilon": epsilon, "rule_ratio": EPS_RULE_RATIO, "rule_row": rule,
               "threads": torch.get_num_threads(), "seconds": round(seconds, 1),
               "cpu_seconds": round(cpu, 1)}  # fmt: skip
    write_atomic(output / "quickstart.json", json.dumps(summary, indent=1) + "\n")
    print(
        f"ε = {epsilon:g} pixel levels ({epsilon:g}/255), for training and the table: the "
        f"smallest of {', '.join(f'{r:g}' for r in QUICKSTART_RADII)} at which FGSM brings MAML's "
        f"Clean-Adversarial accuracy below {EPS_RULE_RATIO:.0%} of its Clean-Clean on its "
        f"final meta-validation ({rule['adversarial_accuracy']} vs {rule['clean_accuracy']} % "
        f"on {config['train']['validation_tasks']} seeded tasks of the meta-training digits)."
    )
    print(f"Digits 16x16, 5-way {results[0].shots}-shot, {args.iterations} meta-iterations, "
          f"{args.tasks} seeded test tasks (digits 5-9), FGSM, paper protocol; accuracy (%) ± 95% CI:")  # fmt: skip
    print(format_compact_table(results, epsilon))
    curve = "; ".join(
        f"{r.method} " + " ".join(f"{e.accuracy:.1f}" for e in r.scenarios
                                  if e.support == "clean" and e.query == "adversarial")
        for r in results
    )  # fmt: skip
    print(f"Clean-Adversarial at ε = {', '.join(f'{r:g}' for r in QUICKSTART_RADII)}: {curve}")
    print("figures: " + ", ".join(str(p) for p in report if p.suffix == ".png"))
    print(f"quickstart finished in {seconds:.0f} s ({cpu:.0f} s CPU, "
          f"{torch.get_num_threads()} torch thread); results in {output}")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="l2l-adversarial", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def add_common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("-o", "--set", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config value, e.g. -o train.iterations=100 (repeatable)")  # fmt: skip
        sub.add_argument("--overwrite", action="store_true", help="replace existing results")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")

    sub = commands.add_parser("train", help="meta-train one method")
    sub.add_argument(
        "config", nargs="?", help="YAML config (see examples/configs); defaults if omitted"
    )
    sub.add_argument(
        "--run-dir", help="run folder (default: runs/<dataset>-<ways>w<shots>s-<method>)"
    )
    sub.add_argument("--resume", action="store_true", help="continue the run in --run-dir exactly")
    add_common(sub)
    sub.set_defaults(handler=command_train)

    sub = commands.add_parser(
        "evaluate", help="evaluate a trained run in the paper's six scenarios"
    )
    sub.add_argument("run_dir")
    sub.add_argument("--output", help="results JSON (default: RUN_DIR/evaluation.json, "
                     "RUN_DIR/evaluation_best.json with --checkpoint best)")  # fmt: skip
    sub.add_argument("--checkpoint", choices=sorted(CHECKPOINTS), default="last",
                     help="the last checkpoint, or the best one of meta-validation (best.pt)")  # fmt: skip
    add_common(sub)
    sub.set_defaults(handler=command_evaluate)

    sub = commands.add_parser("report", help="tables (Markdown, JSON) and figures from results")
    sub.add_argument("results", nargs="+", help="evaluation JSON files")
    sub.add_argument("--output", default="report", help="folder for the tables and figures")
    sub.add_argument("--epsilon", type=float, default=2.0,
                     help="radius (pixel levels) of the step-by-step figures (default 2)")  # fmt: skip
    sub.set_defaults(handler=command_report)

    sub = commands.add_parser(
        "quickstart", help="MAML, MAML-AD and ADML on bundled digits: CPU, about 3 minutes"
    )
    sub.add_argument("--output", default="runs/quickstart")
    sub.add_argument("--iterations", type=int, default=QUICKSTART_ITERATIONS)
    sub.add_argument("--tasks", type=int, default=QUICKSTART_TASKS, help="test tasks per scenario")
    sub.add_argument("--seed", type=int, default=0)
    add_common(sub)
    sub.set_defaults(handler=command_quickstart)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    joins_group = args.command in DISTRIBUTED_COMMANDS and not is_distributed()
    try:
        if joins_group:
            init_from_environment()  # under torchrun; nothing otherwise
        return int(args.handler(args))
    except (
        ConfigError,
        CheckpointError,
        RunFolderError,
        DatasetFileError,
        DatasetDownloadError,
        FileNotFoundError,
    ) as error:
        rank, world_size = world()
        where = f" (rank {rank} of {world_size})" if world_size > 1 else ""
        print(f"error{where}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"\n{interrupt}", file=sys.stderr)
        return 130
    finally:
        if joins_group:
            shutdown()


if __name__ == "__main__":
    sys.exit(main())
