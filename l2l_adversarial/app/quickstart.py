"""The quickstart: MAML, MAML-AD and ADML on the bundled digits, on a CPU in minutes.

MAML trains first, with meta-validation at every candidate radius; the radius of the table is
the smallest at which FGSM breaks MAML (:func:`choose_epsilon`); MAML-AD and ADML then train
at that radius, and all three are evaluated on the same seeded test tasks: the table at that
radius, the robustness curves at all the candidates, the training curves.

Example::

    run_quickstart(Path("runs/quickstart"))   # prints the table, writes evaluation.json
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from l2l_adversarial.app.config import load_config
from l2l_adversarial.app.factory import METHOD_NAMES, resolve_device, task_source
from l2l_adversarial.app.meta_validation import validation_monitor
from l2l_adversarial.app.report import (
    format_compact_table,
    refuse_overwrite,
    save_results,
    write_atomic,
    write_report,
)
from l2l_adversarial.app.run_folder import RunFolderError
from l2l_adversarial.app.runs import evaluate_run
from l2l_adversarial.app.training import CHECKPOINT, train
from l2l_adversarial.evaluation import EvaluationResult, Scenario

__all__ = [
    "EPS_RULE_RATIO",
    "QUICKSTART_ITERATIONS",
    "QUICKSTART_TASKS",
    "choose_epsilon",
    "run_quickstart",
]

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
BASELINE = "maml"
"""The undefended method: it trains without a radius, and its breaking radius is the table's."""
QUICKSTART_METHODS = (BASELINE, "maml-ad", "adml")
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


@dataclasses.dataclass(frozen=True)
class Quickstart:
    """The quickstart's settings: its folder, size, seed and the user's config overrides."""

    output: Path
    iterations: int = QUICKSTART_ITERATIONS
    tasks: int = QUICKSTART_TASKS
    seed: int = 0
    overrides: Sequence[str] = ()
    overwrite: bool = False
    progress: bool = True

    def config(self, method: str, epsilon: float | None) -> dict[str, Any]:
        """MAML trains without a radius; all three are evaluated at ``epsilon``."""
        overrides = [*QUICKSTART, f"method={method}", f"train.iterations={self.iterations}",
                     f"evaluate.tasks={self.tasks}", f"seed={self.seed}"]  # fmt: skip
        if epsilon is not None:
            overrides.append(f"evaluate.eps=[{epsilon}]")
            if method != BASELINE:
                overrides.append(f"train.eps={epsilon}")
        config = load_config(None, [*overrides, *self.overrides])
        resolve_device(config["device"])
        return config

    def train_all(self) -> tuple[float, dict[str, Any]]:
        """Train MAML, choose the radius, train MAML-AD and ADML at it (each run resumed if
        its checkpoint is there and not ``overwrite``). Returns the radius and its rule row."""
        epsilon: float | None = None
        rule: dict[str, Any] = {}
        for method in QUICKSTART_METHODS:
            config = self.config(method, epsilon)
            run_dir = self.output / method
            resume = not self.overwrite and (run_dir / CHECKPOINT).exists()  # checked vs config
            radii = QUICKSTART_RADII if method == BASELINE else ()
            train(config, run_dir, task_source(config, "train", seed=config["seed"]),
                  resume=resume, overwrite=self.overwrite, progress=self.progress,
                  monitor=validation_monitor(config, radii))  # fmt: skip
            if method == BASELINE:
                epsilon, rule = choose_epsilon(run_dir / "validation.csv")
        assert epsilon is not None
        return epsilon, rule

    def evaluate_all(
        self, epsilon: float
    ) -> tuple[list[EvaluationResult], list[dict[str, Any]], dict[str, Path]]:
        """Each method in the six scenarios at ``epsilon``, plus its robustness curve (the
        other radii, clean support only: one adaptation per task). Returns the results, the
        evaluated checkpoints and the run folders by method name."""
        results, checkpoints, runs = [], [], {}
        for method in QUICKSTART_METHODS:
            config, run_dir = self.config(method, epsilon), self.output / method
            runs[METHOD_NAMES[method]] = run_dir
            result, checkpoint = evaluate_run(run_dir, config, progress=self.progress)
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
        return results, checkpoints, runs


def run_quickstart(
    output: Path,
    *,
    iterations: int = QUICKSTART_ITERATIONS,
    tasks: int = QUICKSTART_TASKS,
    seed: int = 0,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    progress: bool = True,
) -> None:
    """Train MAML, pick the radius at which FGSM breaks it, train MAML-AD and ADML at that
    radius, evaluate all three on the same seeded digits tasks, print the table, write the
    figures (``output/report``), the results (``evaluation.json``) and ``quickstart.json``."""
    # A tiny model: one intra-op thread is fastest (two measured 2-15x slower on a 2-core VM).
    torch.set_num_threads(1)
    quickstart = Quickstart(output, iterations=iterations, tasks=tasks, seed=seed,
                            overrides=overrides, overwrite=overwrite, progress=progress)  # fmt: skip
    refuse_overwrite([output / "evaluation.json", output / "quickstart.json"], overwrite)
    started, cpu_started = time.perf_counter(), time.process_time()
    for method in QUICKSTART_METHODS:  # every setting checked before any file is written
        quickstart.config(method, QUICKSTART_RADII[0])
    epsilon, rule = quickstart.train_all()
    results, checkpoints, runs = quickstart.evaluate_all(epsilon)
    save_results(results, output / "evaluation.json", checkpoints)
    report = write_report(results, output / "report", "Digits", results[0].shots,
                          epsilon=epsilon, training_runs=runs)  # fmt: skip
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    summary = {"epsilon": epsilon, "rule_ratio": EPS_RULE_RATIO, "rule_row": rule,
               "threads": torch.get_num_threads(), "seconds": round(seconds, 1),
               "cpu_seconds": round(cpu, 1)}  # fmt: skip
    write_atomic(output / "quickstart.json", json.dumps(summary, indent=1) + "\n")
    validation_tasks = quickstart.config(BASELINE, epsilon)["train"]["validation_tasks"]
    _print_rule(epsilon, rule, validation_tasks)
    _print_results(results, epsilon, iterations, tasks)
    print("figures: " + ", ".join(str(p) for p in report if p.suffix == ".png"))
    print(f"quickstart finished in {seconds:.0f} s ({cpu:.0f} s CPU, "
          f"{torch.get_num_threads()} torch thread); results in {output}")  # fmt: skip


def _print_rule(epsilon: float, rule: dict[str, Any], validation_tasks: int) -> None:
    """Which radius the rule chose, and from which numbers."""
    print(
        f"ε = {epsilon:g} pixel levels ({epsilon:g}/255), for training and the table: the "
        f"smallest of {', '.join(f'{r:g}' for r in QUICKSTART_RADII)} at which FGSM brings MAML's "
        f"Clean-Adversarial accuracy below {EPS_RULE_RATIO:.0%} of its Clean-Clean on its "
        f"final meta-validation ({rule['adversarial_accuracy']} vs {rule['clean_accuracy']} % "
        f"on {validation_tasks} seeded tasks of the meta-training digits)."
    )


def _print_results(
    results: Sequence[EvaluationResult], epsilon: float, iterations: int, tasks: int
) -> None:
    """The compact table at ``epsilon`` and the Clean-Adversarial accuracy at every radius."""
    print(f"Digits 16x16, 5-way {results[0].shots}-shot, {iterations} meta-iterations, "
          f"{tasks} seeded test tasks (digits 5-9), FGSM, paper protocol; accuracy (%) ± 95% CI:")  # fmt: skip
    print(format_compact_table(results, epsilon))
    curve = "; ".join(
        f"{r.method} "
        + " ".join(f"{e.accuracy:.1f}" for e in sorted(r.scenarios, key=lambda e: e.epsilon)
                   if (e.support, e.query) == ("clean", "adversarial"))
        for r in results
    )  # fmt: skip
    print(f"Clean-Adversarial at ε = {', '.join(f'{r:g}' for r in QUICKSTART_RADII)}: {curve}")
