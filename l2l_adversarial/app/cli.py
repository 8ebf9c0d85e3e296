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
import csv
import dataclasses
import json
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

from l2l_adversarial.app.checkpoint import CheckpointError, check_finite_weights, load_checkpoint
from l2l_adversarial.app.config import (
    BUNDLED_DATASETS,
    ConfigError,
    config_changes,
    describe_changes,
    load_config,
)
from l2l_adversarial.app.configs import CONFIG_FOLDER, bundled_configs, config_path
from l2l_adversarial.app.factory import (
    DATASET_TITLES,
    METHOD_NAMES,
    build_learner,
    evaluation_attack,
    resolve_device,
    task_source,
)
from l2l_adversarial.app.meta_validation import BEST_CHECKPOINT, MetaValidator
from l2l_adversarial.app.report import (
    ResultsFileError,
    format_compact_table,
    format_table,
    load_results,
    refuse_overwrite,
    report_paths,
    save_results,
    write_atomic,
    write_report,
)
from l2l_adversarial.app.run_folder import RunFolderError, reader_lock
from l2l_adversarial.app.seeds import seed_run_dirs, seed_runs
from l2l_adversarial.app.signals import interrupt_on_signals
from l2l_adversarial.app.training import CHECKPOINT, train
from l2l_adversarial.data import DatasetFileError
from l2l_adversarial.distributed import (
    init_from_environment,
    is_distributed,
    on_rank0,
    rank_indices,
    shutdown,
    world,
)
from l2l_adversarial.errors import UserError, describe_os_error
from l2l_adversarial.evaluation import EvaluationResult, Scenario, evaluate, few_shot_learner

__all__ = ["main"]

DISTRIBUTED_COMMANDS = ("train", "evaluate")
"""Commands that split their work over the processes of a torchrun launch."""


def default_run_dir(config: dict[str, Any]) -> Path:
    task = config["task"]
    name = f"{config['dataset']['name']}-{task['ways']}w{task['shots']}s-{config['method']}"
    return Path(config["run_dir"] or Path("runs") / name)


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
    try:
        tasks = task_source(
            config, split, seed=config["evaluate"]["seed"], num_tasks=train["validation_tasks"]
        )
    except (DatasetFileError, FileNotFoundError) as error:  # a missing split file
        raise DatasetFileError(
            f"{error}\nmeta-validation (train.validate_every) reads the {split} split: add its "
            "file, or train without it: -o train.validate_every=null"
        ) from error
    return MetaValidator(config, tasks, split=split, epsilons=epsilons)


def load_trained_learner(
    run_dir: Path, config: dict[str, Any], tasks: Any, checkpoint: str = "last"
) -> tuple[nn.Module, dict[str, Any]]:
    """The learner of a finished (or interrupted) run at its last (or its best) checkpoint,
    and what that checkpoint is: ``{"iteration", "digest", "finished"}``.

    Refuses a checkpoint trained with other settings than ``config`` or holding non-finite
    weights.
    """
    path = run_dir / CHECKPOINTS[checkpoint]
    if checkpoint == "best" and not path.exists():
        raise CheckpointError(
            f"{str(path)!r} not found: the run kept no best checkpoint (train.validate_every "
            "was null, or it stopped before its first validation); use --checkpoint last"
        )
    state = load_checkpoint(path, kind="train", expected={"method": config["method"]})
    changes = config_changes(state["config"], config)
    if changes:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was trained with other settings than its config.yaml "
            f"and overrides; evaluate with the run's own settings (drop -o of "
            f"{', '.join(changes)}):\n{describe_changes(changes, 'config')}"
        )
    check_finite_weights(path, state["learner"])
    shape = tasks[0].support_inputs.shape
    learner = build_learner(config, shape[1], shape[-1])
    learner.load_state_dict(state["learner"])
    iteration, total = int(state["iteration"]), config["train"]["iterations"]
    if iteration < total and checkpoint == "last" and world()[0] == 0:
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


def evaluate_run(
    run_dir: Path,
    config: dict[str, Any],
    progress: bool = True,
    checkpoint: str = "last",
    scenarios: Sequence[Scenario] | None = None,
) -> tuple[EvaluationResult, dict[str, Any]]:
    """Evaluate a trained run on the seeded test tasks in the paper's scenarios (or in
    ``scenarios``); return the result and the evaluated checkpoint's iteration and digest
    (read under the folder's shared lock)."""
    settings = config["evaluate"]
    device = resolve_device(config["device"])
    tasks = task_source(config, "test", seed=settings["seed"], num_tasks=settings["tasks"])
    with contextlib.ExitStack() as stack:  # rank 0 locks; its refusal stops every rank
        on_rank0(lambda: stack.enter_context(reader_lock(run_dir)))
        learner, evaluated = load_trained_learner(run_dir, config, tasks, checkpoint)
    with tqdm(
        total=len(rank_indices(len(tasks))),
        desc=f"evaluate {config['method']}",
        disable=not progress or world()[0] != 0,
        dynamic_ncols=True,
    ) as bar:
        result = evaluate(
            few_shot_learner(
                learner.to(device), settings["inner_lr"], settings["adaptation_steps"]
            ),
            tasks,
            method=METHOD_NAMES[config["method"]],
            epsilons=settings["eps"],
            make_attack=evaluation_attack(settings),
            protocol=settings["protocol"],
            scenarios=scenarios,
            seed=settings["seed"],
            dataset=DATASET_TITLES[config["dataset"]["name"]],
            device=device,
            progress=bar,
            engine=settings["engine"],
            chunk_size=settings["chunk_size"],
        )
    if not all(math.isfinite(s.accuracy) for s in result.scenarios):
        raise CheckpointError(
            f"evaluating {str(run_dir)!r} gave non-finite accuracies; check its checkpoint "
            "and evaluate.inner_lr (lower it)"
        )
    return dataclasses.replace(result, training_seed=config["seed"]), evaluated


def command_train(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    if args.accept_changes and not args.resume:
        raise ConfigError("--accept-changes applies to --resume only; add --resume")
    config = load_config(config_path(args.config) if args.config else None, args.set)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(config)
    resolve_device(config["device"])
    for seed_config, seed_dir in seed_runs(config, run_dir, args.seeds):
        tasks = task_source(seed_config, "train", seed=seed_config["seed"])
        train(
            seed_config,
            seed_dir,
            tasks,
            resume=args.resume,
            overwrite=args.overwrite,
            accept_changes=args.accept_changes,
            progress=not args.quiet,
            monitor=validation_monitor(seed_config),
        )
        if world()[0] == 0:
            print(f"trained {config['method']} (seed {seed_config['seed']}): {seed_dir}")
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a run folder, or every ``seed-<seed>`` run of a ``train --seeds`` folder
    (each into its own evaluation.json, or all into ``--output``)."""
    run_dir = Path(args.run_dir)
    runs = [run_dir] if (run_dir / "config.yaml").is_file() else seed_run_dirs(run_dir)
    if not runs:
        raise RunFolderError(
            f"not a run folder, {str(run_dir)!r} has no config.yaml (nor seed-<seed> runs); "
            "give the --run-dir of a train command, or train first"
        )
    configs = [load_config(run / "config.yaml", args.set) for run in runs]
    default = "evaluation.json" if args.checkpoint == "last" else "evaluation_best.json"
    outputs = [Path(args.output)] if args.output else [run / default for run in runs]
    refuse_overwrite(outputs, args.overwrite)
    results, checkpoints = [], []
    for run, config in zip(runs, configs, strict=True):
        result, checkpoint = evaluate_run(
            run, config, progress=not args.quiet, checkpoint=args.checkpoint
        )
        results.append(result)
        checkpoints.append(checkpoint)
        if world()[0] == 0 and not args.output:
            save_results([result], run / default, [checkpoint])
    if world()[0] == 0:
        if args.output:
            save_results(results, outputs[0], checkpoints)
        first = results[0]
        print(format_table(results, first.dataset or configs[0]["dataset"]["name"], first.shots))
        print(f"results: {', '.join(map(str, outputs))}")
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
    groups: dict[tuple[str, int], list[EvaluationResult]] = defaultdict(list)
    runs: dict[tuple[str, int], dict[str, Path]] = defaultdict(dict)
    for path in map(Path, args.results):
        with reader_lock(path.parent):
            loaded = load_results(path)
        for result in loaded:
            key = (result.dataset or "unknown", result.shots)
            groups[key].append(result)
            if (path.parent / "metrics.csv").is_file():  # results inside a run folder
                runs[key][result.method] = path.parent
    tables = {}
    for (dataset, shots), group in sorted(groups.items()):
        try:
            tables[(dataset, shots)] = format_table(group, dataset, shots)
        except ValueError as error:
            raise ResultsFileError(
                f"these results do not make one table ({error}), in "
                f"{', '.join(map(repr, args.results))}; report each run's results once"
            ) from error
    outputs = [
        p
        for (d, s), g in groups.items()
        for p in report_paths(g, args.output, d, s, training=bool(runs[d, s]))
    ]
    refuse_overwrite(outputs, args.overwrite)  # before writing any file
    for (dataset, shots), table in tables.items():
        print(table)
        paths = write_report(groups[(dataset, shots)], args.output, dataset, shots,
                             epsilon=args.epsilon, training_runs=runs[dataset, shots])  # fmt: skip
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
QUICKSTART_SWEEP = (Scenario(0.0, 0.0), Scenario(0.0, 1.0))
"""Scenarios of the robustness curves at the radii other than the table's."""
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
    refuse_overwrite([output / "evaluation.json", output / "quickstart.json"], args.overwrite)
    started, cpu_started = time.perf_counter(), time.process_time()

    def quickstart_config(method: str, epsilon: float | None) -> dict[str, Any]:
        """MAML trains without a radius; all three are evaluated at ``epsilon``."""
        overrides = [*QUICKSTART, f"method={method}", f"train.iterations={args.iterations}",
                     f"evaluate.tasks={args.tasks}", f"seed={args.seed}"]  # fmt: skip
        if epsilon is not None:
            overrides.append(f"evaluate.eps=[{epsilon}]")
            if method != "maml":
                overrides.append(f"train.eps={epsilon}")
        config = load_config(None, [*overrides, *args.set])
        resolve_device(config["device"])
        return config

    for method in QUICKSTART_METHODS:  # every setting checked before any file is written
        quickstart_config(method, QUICKSTART_RADII[0])
    epsilon: float | None = None
    rule: dict[str, Any] = {}
    for method in QUICKSTART_METHODS:
        config = quickstart_config(method, epsilon)
        run_dir = output / method
        resume = not args.overwrite and (run_dir / CHECKPOINT).exists()  # checked against config
        radii = QUICKSTART_RADII if method == "maml" else ()
        train(config, run_dir, task_source(config, "train", seed=config["seed"]), resume=resume,
              overwrite=args.overwrite, progress=not args.quiet,
              monitor=validation_monitor(config, radii))  # fmt: skip
        if method == "maml":
            epsilon, rule = choose_epsilon(run_dir / "validation.csv")
    results, checkpoints, runs = [], [], {}
    for method in QUICKSTART_METHODS:
        config, run_dir = quickstart_config(method, epsilon), output / method
        runs[METHOD_NAMES[method]] = run_dir
        result, checkpoint = evaluate_run(run_dir, config, progress=not args.quiet)
        # the robustness curve: the other radii, clean support only (one adaptation per task)
        config["evaluate"]["eps"] = [r for r in QUICKSTART_RADII if r != epsilon]
        sweep, _ = evaluate_run(run_dir, config, progress=False, scenarios=QUICKSTART_SWEEP)
        results.append(
            dataclasses.replace(
                result,
                scenarios=result.scenarios + sweep.scenarios,
                attacks=result.attacks + sweep.attacks,
            )
        )
        checkpoints.append(checkpoint)
    assert epsilon is not None
    save_results(results, output / "evaluation.json", checkpoints)
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
        f"{r.method} "
        + " ".join(f"{e.accuracy:.1f}" for e in sorted(r.scenarios, key=lambda e: e.epsilon)
                   if (e.support, e.query) == ("clean", "adversarial"))
        for r in results
    )  # fmt: skip
    print(f"Clean-Adversarial at ε = {', '.join(f'{r:g}' for r in QUICKSTART_RADII)}: {curve}")
    print("figures: " + ", ".join(str(p) for p in report if p.suffix == ".png"))
    print(f"quickstart finished in {seconds:.0f} s ({cpu:.0f} s CPU, "
          f"{torch.get_num_threads()} torch thread); results in {output}")  # fmt: skip
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
    sub.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                     help="train one run per training seed, in RUN_DIR/seed-<seed> (or the "
                     "config's seeds: [...]); one process per seed spreads them")  # fmt: skip
    sub.add_argument("--accept-changes", type=_key_list, default=[], metavar="KEY[,KEY]",
                     help="with --resume: continue although these config keys changed "
                     "(e.g. train.meta_lr); config.yaml records the change")  # fmt: skip
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
    sub.add_argument("--overwrite", action="store_true", help="replace existing files")
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
