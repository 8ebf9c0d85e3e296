"""Command line: ``l2l-adversarial {train,evaluate,report,quickstart,configs}`` (also ``python -m
l2l_adversarial``).

Example:
    l2l-adversarial configs                       # the bundled configs (the paper's settings)
    l2l-adversarial train mini-imagenet-5w1s-adml -o dataset.root=~/data   # or a YAML file's path
    l2l-adversarial evaluate runs/mini-imagenet-5w1s-adml
    l2l-adversarial report runs/*/evaluation.json --output report/
    l2l-adversarial quickstart
    torchrun --standalone --nproc_per_node=2 -m l2l_adversarial train CONFIG   # 2 processes
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from l2l_adversarial.algorithms import MatchingNetwork
from l2l_adversarial.attacks import FGSM, PGD
from l2l_adversarial.checkpoint import CheckpointError, load_checkpoint
from l2l_adversarial.config import BUNDLED_DATASETS, ConfigError, load_config
from l2l_adversarial.configs import CONFIG_FOLDER, bundled_configs, config_path
from l2l_adversarial.data import DatasetDownloadError, DatasetFileError, make_tasks
from l2l_adversarial.distributed import (
    init_from_environment,
    is_distributed,
    rank_indices,
    shutdown,
    world,
)
from l2l_adversarial.evaluation import (
    EvaluationResult,
    FewShotLearner,
    GradientLearner,
    MatchingLearner,
    evaluate,
)
from l2l_adversarial.report import format_table, load_results, save_results, write_report
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


def load_trained_learner(run_dir: Path, config: dict[str, Any], tasks: Any) -> nn.Module:
    """The learner of a finished (or interrupted) run, at its last checkpoint."""
    state = load_checkpoint(
        run_dir / CHECKPOINT, kind="train", expected={"method": config["method"]}
    )
    shape = tasks[0].support_inputs.shape
    learner = build_learner(config, shape[1], shape[-1])
    learner.load_state_dict(state["learner"])
    return learner


def few_shot_learner(learner: nn.Module, settings: dict[str, Any]) -> FewShotLearner:
    """How a trained learner adapts at meta-test."""
    if isinstance(learner, MatchingNetwork):
        return MatchingLearner(learner)
    return GradientLearner(learner, lr=settings["inner_lr"], steps=settings["adaptation_steps"])


def evaluate_run(run_dir: Path, config: dict[str, Any], progress: bool = True) -> EvaluationResult:
    """Evaluate a trained run on the seeded test tasks in the paper's scenarios."""
    settings = config["evaluate"]
    tasks = task_source(config, "test", seed=settings["seed"], num_tasks=settings["tasks"])
    learner = load_trained_learner(run_dir, config, tasks)
    make_attack = (
        FGSM
        if settings["attack"] == "fgsm"
        else functools.partial(PGD, steps=settings["pgd_steps"])
    )
    device = resolve_device(config["device"])
    with tqdm(
        total=len(rank_indices(len(tasks))),
        desc=f"evaluate {config['method']}",
        disable=not progress or world()[0] != 0,
        dynamic_ncols=True,
    ) as bar:
        return evaluate(
            few_shot_learner(learner.to(device), settings),
            tasks,
            method=METHOD_NAMES[config["method"]],
            epsilons=settings["eps"],
            make_attack=make_attack,
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
    config = load_config(config_path(args.config) if args.config else None, args.set)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config)
    tasks = task_source(config, "train", seed=config["seed"])
    train(
        config,
        run_dir,
        tasks,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    if world()[0] == 0:
        print(f"trained {config['method']}: {run_dir}")
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunFolderError(f"{str(run_dir)!r} is not a run folder (no config.yaml); train first")
    config = load_config(run_dir / "config.yaml", args.set)
    output = Path(args.output) if args.output else run_dir / "evaluation.json"
    _refuse_overwrite(output, args.overwrite)
    result = evaluate_run(run_dir, config, progress=not args.quiet)
    if world()[0] == 0:
        save_results([result], output)
        print(format_table([result], result.dataset or config["dataset"]["name"], result.shots))
        print(f"results: {output}")
    return 0


def command_configs(args: argparse.Namespace) -> int:
    configs = bundled_configs()
    width = max(map(len, configs))
    for name, description in configs.items():
        print(f"{name:<{width}}  {description}")
    print(
        f"\nfiles in {CONFIG_FOLDER}; train one by name: l2l-adversarial train NAME -o dataset.root=DIR"
    )
    return 0


def command_report(args: argparse.Namespace) -> int:
    results = [result for path in args.results for result in load_results(path)]
    groups: dict[tuple[str, int], list[EvaluationResult]] = defaultdict(list)
    for result in results:
        groups[(result.dataset or "unknown", result.shots)].append(result)
    for (dataset, shots), group in sorted(groups.items()):
        print(format_table(group, dataset, shots))
        for path in write_report(group, args.output, dataset, shots):
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
    "evaluate.adaptation_steps=10",
    "evaluate.eps=[2]",
]


def command_quickstart(args: argparse.Namespace) -> int:
    """Train MAML and ADML briefly on scikit-learn's bundled digits, evaluate, print the table."""
    # A tiny model: one intra-op thread is fastest (two measured 2-15x slower on a 2-core VM).
    torch.set_num_threads(1)
    output = Path(args.output)
    results = []
    started = time.perf_counter()
    for method in ("maml", "adml"):
        overrides = [*QUICKSTART, f"method={method}", f"train.iterations={args.iterations}",
                     f"evaluate.tasks={args.tasks}", f"seed={args.seed}", *args.set]  # fmt: skip
        config = load_config(None, overrides)
        run_dir = output / method
        if args.overwrite or not (run_dir / CHECKPOINT).exists():
            train(config, run_dir, task_source(config, "train", seed=config["seed"]),
                  overwrite=args.overwrite, progress=not args.quiet)  # fmt: skip
        results.append(evaluate_run(run_dir, config, progress=not args.quiet))
    save_results(results, output / "evaluation.json")
    print(format_table(results, "Digits", results[0].shots))
    print(f"quickstart finished in {time.perf_counter() - started:.0f} s; results in {output}")
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
        "config",
        nargs="?",
        help="a bundled config's name (l2l-adversarial configs lists them) or a YAML file's path; "
        "defaults if omitted",
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
    sub.add_argument("--output", help="results JSON (default: RUN_DIR/evaluation.json)")
    add_common(sub)
    sub.set_defaults(handler=command_evaluate)

    sub = commands.add_parser("report", help="tables (Markdown, JSON) and figures from results")
    sub.add_argument("results", nargs="+", help="evaluation JSON files")
    sub.add_argument("--output", default="report", help="folder for the tables and figures")
    sub.set_defaults(handler=command_report)

    sub = commands.add_parser("quickstart", help="MAML vs ADML on bundled digits, CPU, minutes")
    sub.add_argument("--output", default="runs/quickstart")
    sub.add_argument("--iterations", type=int, default=100)
    sub.add_argument("--tasks", type=int, default=40, help="test tasks per scenario")
    sub.add_argument("--seed", type=int, default=0)
    add_common(sub)
    sub.set_defaults(handler=command_quickstart)

    sub = commands.add_parser("configs", help="list the bundled configs (the paper's settings)")
    sub.set_defaults(handler=command_configs)
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
