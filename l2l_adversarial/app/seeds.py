"""Training-seed variance: several meta-training runs per method, summarised and compared.

A test-set confidence interval (:func:`~l2l_adversarial.evaluation.confidence_interval`)
covers the sampling of test tasks only: each run is one meta-training. Meta-training itself
varies from seed to seed, often by more than that interval, so a difference between methods
is read here across several runs:

* :func:`summarise`: per method and scenario, the mean over training seeds of the test
  accuracy, the standard deviation across seeds (``ddof=1``; ``nan`` for one seed), the
  per-seed values, and the mean within-run 95% interval of the test tasks.
* :func:`compare`: a paired comparison of two methods on the same test tasks: the mean
  difference of their per-task accuracies, with a 95% interval from a two-level bootstrap
  that resamples training seeds and, for all seeds alike, test tasks (runs are paired by
  training seed, the tasks by index: every method is evaluated on the same seeded tasks).

Example:
    >>> from l2l_adversarial.evaluation import EvaluationResult, ScenarioResult
    >>> def run(method, seed, accuracies):
    ...     entry = ScenarioResult("clean", "adversarial", 2.0, sum(accuracies) / 3, 0.0, 0.0,
    ...                            [], [], accuracies)
    ...     return EvaluationResult(method, 5, 1, 3, "paper", 2018, "", 1 / 255, [], None,
    ...                             [entry], training_seed=seed)
    >>> runs = [run("ADML", 0, [80.0, 90.0, 70.0]), run("ADML", 1, [70.0, 80.0, 60.0]),
    ...         run("MAML", 0, [50.0, 60.0, 40.0]), run("MAML", 1, [60.0, 70.0, 50.0])]
    >>> adml = summarise(runs)[0]
    >>> adml.method, adml.per_seed, adml.mean, round(adml.std, 3)
    ('ADML', [80.0, 70.0], 75.0, 7.071)
    >>> comparison = compare_all(runs)[0]
    >>> comparison.first, comparison.second, comparison.difference
    ('ADML', 'MAML', 20.0)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from l2l_adversarial.errors import UserError
from l2l_adversarial.evaluation import EvaluationResult

__all__ = [
    "PairedComparison",
    "SeedSummary",
    "SeedsError",
    "compare",
    "compare_all",
    "runs_by_method",
    "seed_run_dirs",
    "seed_runs",
    "summarise",
]

SEED_FOLDER = "seed-{}"
"""A training seed's run folder inside the run folder of ``train --seeds``."""
CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 4000


class SeedsError(UserError, ValueError):
    """Results that cannot be summarised or compared across seeds (e.g. other test tasks)."""


@dataclass(frozen=True)
class SeedSummary:
    """One table entry over training seeds (accuracies in percent)."""

    method: str
    support: str
    query: str
    epsilon: float
    mean: float
    """Mean over training seeds of the test accuracy."""
    std: float
    """Standard deviation across training seeds (``ddof=1``), ``nan`` for a single seed."""
    per_seed: list[float]
    seeds: list[int | None]
    task_ci95: float
    """Mean over the runs of the 95% interval of the test tasks (within-run)."""


@dataclass(frozen=True)
class PairedComparison:
    """``first`` minus ``second`` on the same test tasks, in accuracy points."""

    first: str
    second: str
    support: str
    query: str
    epsilon: float
    difference: float
    low: float
    high: float
    seeds: int
    tasks: int

    @property
    def significant(self) -> bool:
        """Whether the 95% interval excludes zero."""
        return self.low > 0 or self.high < 0


def runs_by_method(results: Sequence[EvaluationResult]) -> dict[str, list[EvaluationResult]]:
    """The runs of every method, sorted by training seed; refuses two runs of one method
    with the same training seed, and runs of one method evaluated on other test tasks."""
    groups: dict[str, list[EvaluationResult]] = {}
    for result in results:
        groups.setdefault(result.method, []).append(result)
    for method, runs in groups.items():
        seeds = [run.training_seed for run in runs]
        if len(runs) > 1 and len(set(seeds)) != len(seeds):
            raise SeedsError(
                f"method {method!r} has several results with training seed(s) {seeds}: "
                "give every run of a method its own seed (train --seeds 0 1 2)"
            )
        _check_same_tasks(method, runs)
        runs.sort(key=lambda run: -1 if run.training_seed is None else run.training_seed)
    return groups


def summarise(results: Sequence[EvaluationResult]) -> list[SeedSummary]:
    """Mean, across-seed spread and per-seed values of every method and scenario."""
    summaries = []
    for method, runs in runs_by_method(results).items():
        for entry in runs[0].scenarios:
            found = [run.find(entry.support, entry.query, entry.epsilon) for run in runs]
            if any(f is None for f in found):
                continue  # a scenario some seed was not evaluated in
            values = [f.accuracy for f in found if f is not None]
            summaries.append(
                SeedSummary(
                    method=method,
                    support=entry.support,
                    query=entry.query,
                    epsilon=entry.epsilon,
                    mean=float(np.mean(values)),
                    std=float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
                    per_seed=values,
                    seeds=[run.training_seed for run in runs],
                    task_ci95=float(np.mean([f.ci95 for f in found if f is not None])),
                )
            )
    return summaries


def compare(
    first: Sequence[EvaluationResult],
    second: Sequence[EvaluationResult],
    support: str,
    query: str,
    epsilon: float,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PairedComparison:
    """Paired difference ``first - second`` of per-task accuracy in one scenario.

    Runs are paired in training-seed order; each pair is evaluated on the same test tasks.
    The interval is the 95% percentile interval of the mean difference under a bootstrap
    that draws training-seed pairs and test tasks with replacement (``resamples`` draws from
    ``numpy.random.default_rng(seed)``). With one seed it covers the test tasks only.
    """
    if len(first) != len(second) or not first:
        raise SeedsError(
            f"{first[0].method if first else 'first'!r} has {len(first)} run(s) and "
            f"{second[0].method if second else 'second'!r} {len(second)}: a paired "
            "comparison needs the same number of training seeds for both"
        )
    _check_same_tasks(f"{first[0].method} vs {second[0].method}", [*first, *second])
    differences = np.array(
        [
            np.subtract(
                _task_accuracies(a, support, query, epsilon),
                _task_accuracies(b, support, query, epsilon),
            )
            for a, b in zip(first, second, strict=True)
        ]
    )  # (seeds, tasks)
    count, tasks = differences.shape
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, count, size=(resamples, count))
    task_draws = rng.integers(0, tasks, size=(resamples, tasks))
    means = differences[seed_draws[:, :, None], task_draws[:, None, :]].mean(axis=(1, 2))
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return PairedComparison(
        first=first[0].method,
        second=second[0].method,
        support=support,
        query=query,
        epsilon=epsilon,
        difference=float(differences.mean()),
        low=float(low),
        high=float(high),
        seeds=count,
        tasks=tasks,
    )


def compare_all(
    results: Sequence[EvaluationResult], *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> list[PairedComparison]:
    """:func:`compare` for every pair of methods (in the order they first appear) and every
    scenario both were evaluated in."""
    groups = runs_by_method(results)
    methods = list(groups)
    comparisons = []
    for i, name in enumerate(methods):
        for other in methods[i + 1 :]:
            for entry in groups[name][0].scenarios:
                key = (entry.support, entry.query, entry.epsilon)
                if all(run.find(*key) is not None for run in [*groups[name], *groups[other]]):
                    comparisons.append(
                        compare(groups[name], groups[other], *key, resamples=resamples, seed=seed)
                    )
    return comparisons


def _task_accuracies(
    result: EvaluationResult, support: str, query: str, epsilon: float
) -> list[float]:
    entry = result.find(support, query, epsilon)
    if entry is None:
        raise SeedsError(
            f"{result.method} (training seed {result.training_seed}) has no "
            f"{support}-{query} result at eps {epsilon:g}; evaluate every run alike"
        )
    return entry.task_accuracies


def _check_same_tasks(what: str, runs: Sequence[EvaluationResult]) -> None:
    keys = {(run.num_tasks, run.seed, run.ways, run.shots) for run in runs}
    if len(keys) > 1:
        raise SeedsError(
            f"{what}: runs were evaluated on different test tasks (tasks, evaluation seed, "
            f"ways, shots: {sorted(keys)}); evaluate all of them with the same "
            "evaluate.tasks and evaluate.seed"
        )


def seed_runs(
    config: dict[str, Any], run_dir: Path, seeds: Sequence[int] | None = None
) -> list[tuple[dict[str, Any], Path]]:
    """One ``(config, run folder)`` per training seed: ``seeds`` (``train --seeds``), else the
    config's ``seeds``, each in ``run_dir/seed-<seed>``; without either, the run itself.

    Example:
        >>> [(c["seed"], str(d)) for c, d in seed_runs({"seed": 0, "seeds": [3, 4]}, Path("r"))]
        [(3, 'r/seed-3'), (4, 'r/seed-4')]
    """
    chosen = list(seeds or config.get("seeds") or [])
    if not chosen:
        return [(config, run_dir)]
    if len(set(chosen)) != len(chosen) or any(seed < 0 for seed in chosen):
        raise SeedsError(
            f"training seeds {chosen}, in --seeds or the config's seeds: give distinct "
            "integers >= 0, e.g. --seeds 0 1 2"
        )
    return [
        ({**config, "seed": seed, "seeds": None}, run_dir / SEED_FOLDER.format(seed))
        for seed in chosen
    ]


def seed_run_dirs(run_dir: Path) -> list[Path]:
    """The ``seed-<seed>`` run folders (holding a config.yaml) in ``run_dir``, by seed."""
    pattern = re.compile(re.escape(SEED_FOLDER).replace(r"\{\}", r"(\d+)") + "$")
    found = []
    for child in run_dir.iterdir() if run_dir.is_dir() else []:
        match = pattern.match(child.name)
        if match and (child / "config.yaml").is_file():
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found)]
