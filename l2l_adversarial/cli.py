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
import contextlib
import functools
import math
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from l2l_adversarial.algorithms import MatchingNetwork
from l2l_adversarial.attacks import FGSM, PGD
from l2l_adversarial.checkpoint import CheckpointError, check_finite_weights, load_checkpoint
from l2l_adversarial.config import BUNDLED_DATASETS, ConfigError, config_changes, load_config
from l2l_adversarial.configs import CONFIG_FOLDER, bundled_configs, config_path
from l2l_adversarial.data import make_tasks
from l2l_adversarial.distributed import (
    init_from_environment,
    is_distributed,
    on_rank0,
    rank_indices,
    shutdown,
    world,
)
from l2l_adversarial.errors import UserError, describe_os_error
from l2l_adversarial.evaluation import (
    EvaluationResult,
    FewShotLearner,
    GradientLearner,
    MatchingLearner,
    evaluate,
)
from l2l_adversarial.report import (
    ResultsFileError,
    format_table,
    load_results,
    refuse_overwrite,
    report_paths,
    save_results,
    write_report,
)
from l2l_adversarial.run_folder import RunFolderError, reader_lock
from l2l_adversarial.signals import interrupt_on_signals
from l2l_adversarial.training import CHECKPOINT, build_learner, resolve_device, train

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


def load_trained_learner(
    run_dir: Path, config: dict[str, Any], tasks: Any
) -> tuple[nn.Module, dict[str, Any]]:
    """The learner of a finished (or interrupted) run at its last checkpoint, and what that
    checkpoint is: ``{"iteration", "digest", "finished"}``.

    Refuses a checkpoint trained with other settings than ``config`` or holding non-finite
    weights.
    """
    path = run_dir / CHECKPOINT
    state = load_checkpoint(path, kind="train", expected={"method": config["method"]})
    changes = config_changes(state["config"], config)
    if changes:
        listed = "\n  ".join(
            f"{k}: checkpoint {a!r}, config {b!r}" for k, (a, b) in changes.items()
        )
        raise CheckpointError(
            f"checkpoint {str(path)!r} was trained with other settings than its config.yaml "
            f"and overrides; evaluate with the run's own settings (drop -o of "
            f"{', '.join(changes)}):\n  {listed}"
        )
    check_finite_weights(path, state["learner"])
    shape = tasks[0].support_inputs.shape
    learner = build_learner(config, shape[1], shape[-1])
    learner.load_state_dict(state["learner"])
    iteration, total = int(state["iteration"]), config["train"]["iterations"]
    if iteration < total and world()[0] == 0:
        print(
            f"warning: {str(run_dir)!r} is unfinished (checkpoint of iteration {iteration} "
            f"of {total}); evaluating that checkpoint, finish it with train --resume",
            file=sys.stderr,
        )
    return learner, {
        "iteration": iteration,
        "digest": state["digest"],
        "finished": iteration >= total,
    }


def few_shot_learner(learner: nn.Module, settings: dict[str, Any]) -> FewShotLearner:
    """How a trained learner adapts at meta-test."""
    if isinstance(learner, MatchingNetwork):
        return MatchingLearner(learner)
    return GradientLearner(learner, lr=settings["inner_lr"], steps=settings["adaptation_steps"])


def evaluate_run(
    run_dir: Path, config: dict[str, Any], progress: bool = True
) -> tuple[EvaluationResult, dict[str, Any]]:
    """Evaluate a trained run on the seeded test tasks in the paper's scenarios; return the
    result and the evaluated checkpoint's iteration and digest (read under the folder's
    shared lock)."""
    settings = config["evaluate"]
    device = resolve_device(config["device"])
    tasks = task_source(config, "test", seed=settings["seed"], num_tasks=settings["tasks"])
    with contextlib.ExitStack() as stack:  # rank 0 locks; its refusal stops every rank
        on_rank0(lambda: stack.enter_context(reader_lock(run_dir)))
        learner, checkpoint = load_trained_learner(run_dir, config, tasks)
    make_attack = (
        FGSM
        if settings["attack"] == "fgsm"
        else functools.partial(PGD, steps=settings["pgd_steps"])
    )
    with tqdm(
        total=len(rank_indices(len(tasks))),
        desc=f"evaluate {config['method']}",
        disable=not progress or world()[0] != 0,
        dynamic_ncols=True,
    ) as bar:
        result = evaluate(
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
    if not all(math.isfinite(s.accuracy) for s in result.scenarios):
        raise CheckpointError(
            f"evaluating {str(run_dir)!r} gave non-finite accuracies; check its checkpoint "
            "and evaluate.inner_lr (lower it)"
        )
    return result, checkpoint


def command_train(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    if args.accept_changes and not args.resume:
        raise ConfigError("--accept-changes applies to --resume only; add --resume")
    config = load_config(config_path(args.config) if args.config else None, args.set)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config)
    resolve_device(config["device"])
    tasks = task_source(config, "train", seed=config["seed"])
    train(
        config,
        run_dir,
        tasks,
        resume=args.resume,
        overwrite=args.overwrite,
        accept_changes=args.accept_changes,
        progress=not args.quiet,
    )
    if world()[0] == 0:
        print(f"trained {config['method']}: {run_dir}")
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunFolderError(
            f"not a run folder, {str(run_dir)!r} has no config.yaml; give the --run-dir of a "
            "train command, or train first"
        )
    config = load_config(run_dir / "config.yaml", args.set)
    output = Path(args.output) if args.output else run_dir / "evaluation.json"
    refuse_overwrite([output], args.overwrite)
    result, checkpoint = evaluate_run(run_dir, config, progress=not args.quiet)
    if world()[0] == 0:
        save_results([result], output, [checkpoint])
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
    results = []
    for path in args.results:
        with reader_lock(Path(path).parent):
            results += load_results(path)
    groups: dict[tuple[str, int], list[EvaluationResult]] = defaultdict(list)
    for result in results:
        groups[(result.dataset or "unknown", result.shots)].append(result)
    tables = {}
    for (dataset, shots), group in sorted(groups.items()):
        try:
            tables[(dataset, shots)] = format_table(group, dataset, shots)
        except ValueError as error:
            raise ResultsFileError(
                f"these results do not make one table ({error}), in "
                f"{', '.join(map(repr, args.results))}; report each run's results once"
            ) from error
    outputs = [p for (d, s), g in groups.items() for p in report_paths(g, args.output, d, s)]
    refuse_overwrite(outputs, args.overwrite)  # before writing any file
    for (dataset, shots), table in tables.items():
        print(table)
        for path in write_report(groups[(dataset, shots)], args.output, dataset, shots):
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
    refuse_overwrite([output / "evaluation.json"], args.overwrite)
    started = time.perf_counter()
    configs = {}
    for method in ("maml", "adml"):  # every setting checked before any file is written
        overrides = [*QUICKSTART, f"method={method}", f"train.iterations={args.iterations}",
                     f"evaluate.tasks={args.tasks}", f"seed={args.seed}", *args.set]  # fmt: skip
        configs[method] = load_config(None, overrides)
        resolve_device(configs[method]["device"])
    results, checkpoints = [], []
    for method, config in configs.items():
        run_dir = output / method
        resume = not args.overwrite and (run_dir / CHECKPOINT).exists()  # checked against config
        train(config, run_dir, task_source(config, "train", seed=config["seed"]), resume=resume,
              overwrite=args.overwrite, progress=not args.quiet)  # fmt: skip
        result, checkpoint = evaluate_run(run_dir, config, progress=not args.quiet)
        results.append(result)
        checkpoints.append(checkpoint)
    save_results(results, output / "evaluation.json", checkpoints)
    print(format_table(results, "Digits", results[0].shots))
    print(f"quickstart finished in {time.perf_counter() - started:.0f} s; results in {output}")
    return 0


def _key_list(text: str) -> list[str]:
    return [key.strip() for key in text.split(",") if key.strip()]


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
    sub.add_argument("--accept-changes", type=_key_list, default=[], metavar="KEY[,KEY]",
                     help="with --resume: continue although these config keys changed "
                     "(e.g. train.meta_lr); config.yaml records the change")  # fmt: skip
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
    sub.add_argument("--overwrite", action="store_true", help="replace existing files")
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
    """Run a command; a user's error ends as one ``error: ...`` line and status 2, a signal
    as one line and ``128 + signal``, anything else (a bug) with its traceback and status 1."""
    args = build_parser().parse_args(argv)
    joins_group = args.command in DISTRIBUTED_COMMANDS and not is_distributed()
    rank, world_size = world()
    try:
        with interrupt_on_signals():
            if joins_group:
                init_from_environment()  # under torchrun; nothing otherwise
                rank, world_size = world()
            return int(args.handler(args))
    except (UserError, OSError) as error:
        message = str(error) if isinstance(error, UserError) else describe_os_error(error)
        where = f" (rank {rank} of {world_size})" if world_size > 1 else ""
        print(f"error{where}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        name = getattr(interrupt, "name", "SIGINT")
        message = str(interrupt) or (
            f"interrupted ({name}) before {args.command} wrote its results; run it again"
        )
        print(message, file=sys.stderr)
        return int(getattr(interrupt, "exit_code", 130))
    except Exception:
        traceback.print_exc()
        print(
            f"error: internal error in l2l-adversarial {args.command} (a bug, not your input); "
            "please report it with the traceback above",
            file=sys.stderr,
        )
        return 1
    finally:
        if joins_group:
            shutdown()


if __name__ == "__main__":
    sys.exit(main())
