"""Run folders as the commands use them: train one (or one per training seed), load the
trained learner back, evaluate it in the paper's scenarios and save the results.

Example::

    folders = train_runs("mini-imagenet-5w1s-adml", ["dataset.root=~/data"])
    evaluate_runs(folders[0])   # writes RUN_DIR/evaluation.json, prints the table
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from tqdm import tqdm

from l2l_adversarial.app.checkpoint import CheckpointError, check_finite_weights, load_checkpoint
from l2l_adversarial.app.config import config_changes, describe_changes, load_config
from l2l_adversarial.app.configs import config_path
from l2l_adversarial.app.factory import (
    DATASET_TITLES,
    METHOD_NAMES,
    build_learner,
    evaluation_options,
    resolve_device,
    task_source,
)
from l2l_adversarial.app.meta_validation import BEST_CHECKPOINT, validation_monitor
from l2l_adversarial.app.report import format_table, refuse_overwrite, save_results
from l2l_adversarial.app.run_folder import RunFolderError, reader_lock
from l2l_adversarial.app.seeds import seed_run_dirs, seed_runs
from l2l_adversarial.app.training import CHECKPOINT, train
from l2l_adversarial.distributed import on_rank0, rank_indices, world
from l2l_adversarial.evaluation import EvaluationResult, Scenario, evaluate, few_shot_learner

__all__ = [
    "CHECKPOINTS",
    "default_run_dir",
    "evaluate_run",
    "evaluate_runs",
    "load_trained_learner",
    "train_runs",
]

CHECKPOINTS = {"last": CHECKPOINT, "best": BEST_CHECKPOINT}
"""``evaluate --checkpoint``: the last checkpoint, or the best one of meta-validation."""


def default_run_dir(config: dict[str, Any]) -> Path:
    """``config``'s ``run_dir``, else ``runs/<dataset>-<ways>w<shots>s-<method>``.

    Example:
        >>> from l2l_adversarial.app.config import load_config
        >>> str(default_run_dir(load_config(None, ["dataset.name=digits", "method=maml"])))
        'runs/digits-5w1s-maml'
    """
    task = config["task"]
    name = f"{config['dataset']['name']}-{task['ways']}w{task['shots']}s-{config['method']}"
    return Path(config["run_dir"] or Path("runs") / name)


def _is_rank0() -> bool:
    return world()[0] == 0


def train_runs(
    config: str | None,
    overrides: Sequence[str] = (),
    *,
    run_dir: str | None = None,
    seeds: Sequence[int] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    accept_changes: Collection[str] = (),
    progress: bool = True,
) -> list[Path]:
    """Meta-train the config (a bundled name, a YAML file's path, or ``None`` for the
    defaults) with ``overrides``: one run in ``run_dir`` (default :func:`default_run_dir`), or
    one per training seed in ``run_dir/seed-<seed>``. Returns the run folders."""
    loaded = load_config(config_path(config) if config else None, overrides)
    folder = Path(run_dir) if run_dir else default_run_dir(loaded)
    resolve_device(loaded["device"])
    folders = []
    for seed_config, seed_dir in seed_runs(loaded, folder, seeds):
        tasks = task_source(seed_config, "train", seed=seed_config["seed"])
        train(seed_config, seed_dir, tasks, resume=resume, overwrite=overwrite,
              accept_changes=accept_changes, progress=progress,
              monitor=validation_monitor(seed_config))  # fmt: skip
        if _is_rank0():
            print(f"trained {loaded['method']} (seed {seed_config['seed']}): {seed_dir}")
        folders.append(seed_dir)
    return folders


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
            f"and overrides ({describe_changes(changes, 'config')}); evaluate with the run's "
            f"own settings (drop -o of {', '.join(changes)})"
        )
    check_finite_weights(path, state["learner"])
    shape = tasks[0].support_inputs.shape
    learner = build_learner(config, shape[1], shape[-1])
    learner.load_state_dict(state["learner"])
    iteration, total = int(state["iteration"]), config["train"]["iterations"]
    if iteration < total and checkpoint == "last" and _is_rank0():
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
    ``scenarios``) under ``evaluate``'s settings (:func:`evaluation_options`); return the
    result and the evaluated checkpoint's iteration and digest (read under the folder's shared
    lock). The result records ``evaluate.protocol`` (``literature`` included)."""
    settings = config["evaluate"]
    options = evaluation_options(settings)
    if scenarios is not None:
        options["scenarios"] = scenarios
    device = resolve_device(config["device"])
    tasks = task_source(config, "test", seed=settings["seed"], num_tasks=settings["tasks"])
    with contextlib.ExitStack() as stack:  # rank 0 locks; its refusal stops every rank
        on_rank0(lambda: stack.enter_context(reader_lock(run_dir)))
        learner, evaluated = load_trained_learner(run_dir, config, tasks, checkpoint)
    with tqdm(
        total=len(rank_indices(len(tasks))),
        desc=f"evaluate {config['method']}",
        disable=not progress or not _is_rank0(),
        dynamic_ncols=True,
    ) as bar:
        result = evaluate(
            few_shot_learner(
                learner.to(device), settings["inner_lr"], settings["adaptation_steps"]
            ),
            tasks,
            method=METHOD_NAMES[config["method"]],
            dataset=DATASET_TITLES[config["dataset"]["name"]],
            device=device,
            progress=bar,
            **options,
        )
    if not all(math.isfinite(s.accuracy) for s in result.scenarios):
        raise CheckpointError(
            f"evaluating {str(run_dir)!r} gave non-finite accuracies; check its checkpoint "
            "and evaluate.inner_lr (lower it)"
        )
    recorded = dataclasses.replace(
        result, training_seed=config["seed"], protocol=settings["protocol"]
    )
    return recorded, evaluated


def _run_folders(run_dir: Path) -> list[Path]:
    """A run folder, or every ``seed-<seed>`` run of a ``train --seeds`` folder."""
    runs = [run_dir] if (run_dir / "config.yaml").is_file() else seed_run_dirs(run_dir)
    if not runs:
        raise RunFolderError(
            f"not a run folder, {str(run_dir)!r} has no config.yaml (nor seed-<seed> runs); "
            "give the --run-dir of a train command, or train first"
        )
    return runs


def evaluate_runs(
    run_dir: str | Path,
    overrides: Sequence[str] = (),
    *,
    output: str | None = None,
    checkpoint: str = "last",
    overwrite: bool = False,
    progress: bool = True,
) -> list[Path]:
    """Evaluate a run folder, or every ``seed-<seed>`` run of a ``train --seeds`` folder, at
    its last (or best) ``checkpoint``: each into its own ``evaluation.json``
    (``evaluation_best.json``), or all into ``output``; print the table. Returns the files."""
    runs = _run_folders(Path(run_dir))
    configs = [load_config(run / "config.yaml", overrides) for run in runs]
    default = "evaluation.json" if checkpoint == "last" else "evaluation_best.json"
    outputs = [Path(output)] if output else [run / default for run in runs]
    refuse_overwrite(outputs, overwrite)
    results, checkpoints = [], []
    for run, config in zip(runs, configs, strict=True):
        result, evaluated = evaluate_run(run, config, progress=progress, checkpoint=checkpoint)
        results.append(result)
        checkpoints.append(evaluated)
        if _is_rank0() and not output:
            save_results([result], run / default, [evaluated])
    if _is_rank0():
        if output:
            save_results(results, outputs[0], checkpoints)
        first = results[0]
        print(format_table(results, first.dataset or configs[0]["dataset"]["name"], first.shots))
        print(f"results: {', '.join(map(str, outputs))}")
    return outputs
