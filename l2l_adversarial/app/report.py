"""Tables 1-4 and Figures 2-5 of the paper from evaluation results, next to the paper's numbers.

The paper's numbers ship with the package (``resources/paper_tables.json``, the tables
digitised). A table has the paper's layout: methods x support scenario (rows) x epsilon x
query scenario (columns); every cell reads ``ours ± ci | paper ± ci`` (accuracy in percent),
with "—" where a number does not exist (a method the paper did not run, or one we did not).
All files are written atomically (temporary file, then ``os.replace``).

Example:
    >>> print(format_table([], "MiniImageNet", shots=1).splitlines()[0])
    ### Table 1. Average classification accuracies on MiniImageNet (5-way, 1-shot)
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import itertools
import json
import math
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from l2l_adversarial.app.files import write_atomic
from l2l_adversarial.app.run_folder import reader_lock
from l2l_adversarial.app.seeds import SeedSummary, compare_all, runs_by_method, summarise
from l2l_adversarial.errors import UserError
from l2l_adversarial.evaluation import EvaluationResult, Scenario
from l2l_adversarial.validation import check_choice

PAPER_METHODS = ("MAML", "MAML-AD", "ADML", "Matching Nets")
"""The methods of Tables 1-4, in the paper's order; other methods are appended."""
PAPER_EPSILONS = (2.0, 0.2)
TABLE_NUMBERS = {
    ("miniimagenet", 1): 1,
    ("miniimagenet", 5): 2,
    ("cifar100", 1): 3,
    ("cifar100", 5): 4,
}
"""(normalised dataset name, shots) -> table number."""
FIGURE_SCENARIOS = (
    Scenario(0.0, 0.0),
    Scenario(0.0, 1.0),
    Scenario(1.0, 0.0),
    Scenario(1.0, 1.0),
)
"""The four panels of Figures 2-5."""
METRICS = ("accuracy", "loss")
MISSING = "—"
METHOD_COLORS = {
    "MAML": "tab:blue",
    "MAML-AD": "tab:orange",
    "ADML": "tab:green",
    "Matching Nets": "tab:purple",
    "AQ": "tab:red",
}
"""One colour per method in every figure; other methods take the remaining tab10 colours."""
_SPARE_COLORS = ("tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan")
EPSILON_LABEL = "ε (8-bit pixel levels: ε/255 on [0, 1] images)"

__all__ = [
    "FIGURE_SCENARIOS",
    "benchmark_json",
    "format_benchmark",
    "ResultsExistError",
    "ResultsFileError",
    "PAPER_METHODS",
    "TABLE_NUMBERS",
    "format_compact_table",
    "format_table",
    "load_paper_tables",
    "method_color",
    "load_results",
    "paper_entries",
    "report_paths",
    "plot_curves",
    "plot_robustness",
    "plot_training",
    "refuse_overwrite",
    "report_results",
    "save_results",
    "table_json",
    "table_number",
    "write_atomic",
    "write_report",
]


def method_color(method: str) -> str:
    """The colour of ``method`` in every figure.

    Example:
        >>> method_color("ADML"), method_color("ADML") == method_color("MAML")
        ('tab:green', False)
    """
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return _SPARE_COLORS[sum(map(ord, method)) % len(_SPARE_COLORS)]


def load_paper_tables() -> list[dict[str, Any]]:
    """The paper's Tables 1-4 as entries ``{table, dataset, ways, shots, method, support,
    epsilon, query, accuracy, ci95}`` (accuracy and ci95 in percent).

    Example:
        >>> len(load_paper_tables())
        160
    """
    return list(json.loads(_paper_tables_text()))


@functools.cache
def _paper_tables_text() -> str:
    resource = resources.files("l2l_adversarial.app").joinpath("resources", "paper_tables.json")
    return resource.read_text(encoding="utf-8")


def _dataset_key(dataset: str) -> str:
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(
            f"dataset must be a non-empty name such as 'MiniImageNet', got {dataset!r}"
        )
    return re.sub(r"[^a-z0-9]", "", dataset.lower())


def table_number(dataset: str, shots: int) -> int | None:
    """The paper's table for ``dataset`` and ``shots``; ``None`` if the paper has none.

    Example:
        >>> table_number("MiniImageNet", 5), table_number("cifar-100", 1), table_number("Omniglot", 1)
        (2, 3, None)
    """
    return TABLE_NUMBERS.get((_dataset_key(dataset), shots))


def paper_entries(dataset: str, shots: int) -> list[dict[str, Any]]:
    """The paper's entries of the table for ``dataset`` and ``shots`` (empty if none)."""
    number = table_number(dataset, shots)
    return [entry for entry in load_paper_tables() if entry["table"] == number]


def _supports(shots: int) -> tuple[str, ...]:
    return ("clean", "40%", "adversarial") if shots > 1 else ("clean", "adversarial")


def _check_results(
    results: Sequence[EvaluationResult], dataset: str, shots: int
) -> list[EvaluationResult]:
    results = list(results)
    key = _dataset_key(dataset)
    seen: set[tuple[str, int | None]] = set()
    for result in results:
        if not isinstance(result, EvaluationResult):
            raise TypeError(f"results must hold EvaluationResult, got {type(result).__name__}")
        if result.shots != shots:
            raise ValueError(
                f"result of {result.method!r} is {result.shots}-shot, the table {shots}-shot"
            )
        if result.dataset is not None and _dataset_key(result.dataset) != key:
            raise ValueError(
                f"result of {result.method!r} is on {result.dataset!r}, the table on {dataset!r}"
            )
        run = (result.method, result.training_seed)
        if run in seen:
            raise ValueError(
                f"two results for method {result.method!r} with training seed "
                f"{result.training_seed}: give each a unique name, or train with --seeds"
            )
        seen.add(run)
    runs_by_method(results)  # several seeds of a method: evaluated on the same tasks
    return results


def _epsilons(results: Sequence[EvaluationResult]) -> list[float]:
    epsilons = list(PAPER_EPSILONS)
    for result in results:
        for entry in result.scenarios:
            if not any(math.isclose(entry.epsilon, e) for e in epsilons):
                epsilons.append(entry.epsilon)
    return epsilons


def table_json(results: Sequence[EvaluationResult], dataset: str, shots: int) -> dict[str, Any]:
    """The table as a JSON-ready dictionary: one entry per (method, support, epsilon, query)
    with ``ours`` and ``paper`` (``{"accuracy", "ci95"}`` or ``None``). A method with runs
    of several training seeds gets their mean accuracy and mean test-task interval, and
    ``seed_std`` (across seeds), ``per_seed`` and ``seeds``; ``comparisons`` then holds the
    paired method differences of :func:`~l2l_adversarial.app.seeds.compare_all`.

    Example:
        >>> table = table_json([], "CIFAR100", shots=5)
        >>> table["table"], table["entries"][0]["paper"]
        (4, {'accuracy': 74.03, 'ci95': 0.89})
    """
    results = _check_results(results, dataset, shots)
    number = table_number(dataset, shots)
    reference_entries = paper_entries(dataset, shots)
    paper = {
        (e["method"], e["support"], float(e["epsilon"]), e["query"]): e for e in reference_entries
    }
    ours = {(s.method, s.support, s.epsilon, s.query): s for s in summarise(results)}
    several_seeds = len({(r.method, r.training_seed) for r in results}) > len(
        {r.method for r in results}
    )
    named = dict.fromkeys(r.method for r in results)
    methods = list(PAPER_METHODS) + [m for m in named if m not in PAPER_METHODS]
    ways_found = {result.ways for result in results} or {e["ways"] for e in paper.values()}
    ways = ways_found.pop() if len(ways_found) == 1 else None
    display = reference_entries[0]["dataset"] if reference_entries else dataset
    epsilons = _epsilons(results)
    entries = _table_entries(ours, paper, methods, _supports(shots), epsilons)
    prefix = f"Table {number}. " if number is not None else ""
    return {
        "table": number,
        "title": f"{prefix}Average classification accuracies on {display} "
        f"({ways if ways is not None else '?'}-way, {shots}-shot)",
        "dataset": display,
        "ways": ways,
        "shots": shots,
        "epsilons": epsilons,
        "methods": [_method_json(r) for r in results],
        "entries": entries,
        "comparisons": [dataclasses.asdict(c) for c in compare_all(results)]
        if several_seeds
        else [],
    }


_Cell = TypeVar("_Cell")


def _find(
    cells: Mapping[tuple[str, str, float, str], _Cell],
    method: str,
    support: str,
    epsilon: float,
    query: str,
) -> _Cell | None:
    """The cell of ``method``, ``support`` and ``query`` at the radius close to ``epsilon``."""
    return next(
        (
            value
            for (m, s, e, q), value in cells.items()
            if (m, s, q) == (method, support, query) and math.isclose(e, epsilon)
        ),
        None,
    )


def _table_entries(
    ours: Mapping[tuple[str, str, float, str], SeedSummary],
    paper: Mapping[tuple[str, str, float, str], dict[str, Any]],
    methods: Sequence[str],
    supports: Sequence[str],
    epsilons: Sequence[float],
) -> list[dict[str, Any]]:
    """One entry per method, support, radius and query: ours and the paper's (or ``None``)."""
    entries = []
    for key in itertools.product(methods, supports, epsilons, ("clean", "adversarial")):
        reference = _find(paper, *key)
        entries.append(
            {
                **dict(zip(("method", "support", "epsilon", "query"), key, strict=True)),
                "ours": _ours(_find(ours, *key)),
                "paper": None
                if reference is None
                else {"accuracy": reference["accuracy"], "ci95": reference["ci95"]},
            }
        )
    return entries


def _method_json(result: EvaluationResult) -> dict[str, Any]:
    """How a method's result was measured, for the table's notes."""
    return {
        "method": result.method,
        "num_tasks": result.num_tasks,
        "protocol": result.protocol,
        "attacks": result.attacks,
        "learner": result.learner,
        "seed": result.seed,
        "training_seed": result.training_seed,
    }


def _ours(summary: SeedSummary | None) -> dict[str, Any] | None:
    if summary is None:
        return None
    value: dict[str, Any] = {"accuracy": summary.mean, "ci95": summary.task_ci95}
    if len(summary.per_seed) > 1:
        value.update(seed_std=summary.std, per_seed=summary.per_seed, seeds=summary.seeds)
    return value


def _cell(value: dict[str, Any] | None) -> str:
    if value is None:
        return MISSING
    if "seed_std" in value:  # mean ± spread across seeds [test-task interval]
        return f"{value['accuracy']:.2f} ± {value['seed_std']:.2f} [{value['ci95']:.2f}]"
    return f"{value['accuracy']:.2f} ± {value['ci95']:.2f}"


def format_comparisons(comparisons: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown lines of the paired method differences in :func:`table_json`."""
    if not comparisons:
        return []
    first = comparisons[0]
    lines = [
        "",
        f"Paired differences over {first['seeds']} training seed(s) x {first['tasks']} shared "
        "test tasks (accuracy points, 95% bootstrap interval over seeds and tasks; "
        "* = the interval excludes 0):",
        "",
    ]
    for c in comparisons:
        scenario = f"{c['support'].capitalize()}-{c['query'].capitalize()}"
        mark = " *" if c["low"] > 0 or c["high"] < 0 else ""
        lines.append(
            f"- {c['first']} − {c['second']}, {scenario}, ε = {c['epsilon']:g}: "
            f"{c['difference']:+.2f} [{c['low']:+.2f}, {c['high']:+.2f}]{mark}"
        )
    return lines


def format_table(results: Sequence[EvaluationResult], dataset: str, shots: int) -> str:
    """The table in Markdown; every cell reads ``ours ± ci | paper ± ci`` (percent).

    Example:
        >>> "48.47 ± 1.78" in format_table([], "MiniImageNet", shots=1)
        True
    """
    table = table_json(results, dataset, shots)
    epsilons = table["epsilons"]
    columns = [(e, q) for e in epsilons for q in ("clean", "adversarial")]
    header = ["Method", "Meta-testing"] + [f"ε = {e:g}, {q.capitalize()}" for e, q in columns]
    cells = {(x["method"], x["support"], x["epsilon"], x["query"]): x for x in table["entries"]}
    lines = [
        f"### {table['title']}",
        "",
        "Accuracy (%) ± 95% confidence interval: ours \\| paper. Rows: support set at "
        "meta-test; columns: attack radius (8-bit pixel levels) and query set."
        + (
            " Ours over several training seeds: mean ± standard deviation across seeds "
            "[mean 95% interval of the test tasks]."
            if table["comparisons"]
            else ""
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    methods = list(dict.fromkeys(x["method"] for x in table["entries"]))
    for method in methods:
        for support in _supports(shots):
            row = [method, support.capitalize()]
            for epsilon, query in columns:
                entry = cells[method, support, epsilon, query]
                row.append(f"{_cell(entry['ours'])} \\| {_cell(entry['paper'])}")
            lines.append("| " + " | ".join(row) + " |")
    if table["methods"]:
        lines.append("")
        for m in table["methods"]:
            lines.append(
                f"- {m['method']}: tasks {m['num_tasks']}, protocol {m['protocol']!r}, "
                f"{m['learner']}, evaluation seed {m['seed']}"
                + ("" if m["training_seed"] is None else f", training seed {m['training_seed']}")
                + f", attacks: {'; '.join(m['attacks'])}"
            )
    lines += format_comparisons(table["comparisons"])
    return "\n".join(lines) + "\n"


def benchmark_json(results: Mapping[str, Sequence[EvaluationResult]]) -> dict[str, Any]:
    """One table of several protocols (``{protocol: results}``) of one dataset and shots:
    per protocol, the measured columns (radius, support, query), one row per method with a
    cell per column (``{"accuracy", "ci95"}``, and ``seed_std``, ``per_seed`` and ``seeds``
    over several training seeds, as in :func:`table_json`), how each run was measured, and
    the paired comparisons of every two methods
    (:func:`~l2l_adversarial.app.seeds.compare_all`).

    Example:
        >>> benchmark_json({"paper": []})["protocols"]["paper"]["rows"]
        []
    """
    every = [result for group in results.values() for result in group]
    dataset = next((r.dataset for r in every if r.dataset), "unknown")
    shots = every[0].shots if every else 1
    protocols = {}
    for protocol, group in results.items():
        checked = _check_results(group, dataset, shots)
        summaries = summarise(checked)
        columns = list(dict.fromkeys((s.epsilon, s.support, s.query) for s in summaries))
        cells = {(s.method, s.epsilon, s.support, s.query): s for s in summaries}
        protocols[protocol] = {
            "columns": [
                dict(zip(("epsilon", "support", "query"), c, strict=True)) for c in columns
            ],
            "rows": [
                {"method": method, "cells": [_ours(cells.get((method, *c))) for c in columns]}
                for method in dict.fromkeys(r.method for r in checked)
            ],
            "methods": [_method_json(r) for r in checked],
            "comparisons": [dataclasses.asdict(c) for c in compare_all(checked)],
        }
    ways = {r.ways for r in every}
    return {"dataset": dataset, "ways": ways.pop() if len(ways) == 1 else None, "shots": shots,
            "protocols": protocols}  # fmt: skip


def format_benchmark(table: Mapping[str, Any]) -> str:
    """:func:`benchmark_json`'s table in Markdown: one section per protocol.

    Example:
        >>> print(format_benchmark(benchmark_json({"paper": []})).splitlines()[0])
        ### Benchmark: unknown, ?-way 1-shot
    """
    lines = [
        f"### Benchmark: {table['dataset']}, {table['ways'] or '?'}-way {table['shots']}-shot",
        "",
        "Accuracy (%): over several training seeds, mean ± standard deviation across seeds "
        "[mean 95% interval of the test tasks]; one seed: ± the 95% interval of the test tasks.",
    ]
    for protocol, part in table["protocols"].items():
        header = ["Method"] + [
            f"{c['support'].capitalize()}-{c['query'].capitalize()}, ε = {c['epsilon']:g}"
            for c in part["columns"]
        ]
        lines += ["", f"#### Protocol `{protocol}`", "", "| " + " | ".join(header) + " |",
                  "|" + " --- |" * len(header)]  # fmt: skip
        for row in part["rows"]:
            lines.append(f"| {row['method']} | " + " | ".join(map(_cell, row["cells"])) + " |")
        if part["methods"]:
            first = part["methods"][0]
            seeds: dict[str, list[int | None]] = {m["method"]: [] for m in part["methods"]}
            for m in part["methods"]:
                seeds[m["method"]].append(m["training_seed"])
            lines += ["", f"Tasks {first['num_tasks']} (evaluation seed {first['seed']}), "
                      f"protocol {first['protocol']!r}, attacks: {'; '.join(first['attacks'])}; "
                      "training seeds: "
                      + ", ".join(f"{name} {values}" for name, values in seeds.items())]  # fmt: skip
        lines += format_comparisons(part["comparisons"])
    return "\n".join(lines) + "\n"


def plot_curves(
    results: Sequence[EvaluationResult],
    path: str | os.PathLike[str],
    metric: str = "accuracy",
    *,
    epsilon: float = 2.0,
    title: str | None = None,
) -> Path:
    """Figures 2-5: mean query loss or top-1 accuracy over the adaptation step, one line per
    method (with several training seeds: their mean, and a band of ± one sd across seeds),
    one panel per scenario (Clean-Clean, Clean-Adversarial, Adversarial-Clean,
    Adversarial-Adversarial) at ``epsilon``. Writes a PNG to ``path``.

    Example:
        >>> plot_curves(results, "figure3.png", "accuracy")  # doctest: +SKIP
    """
    check_choice("metric", metric, METRICS)
    if not results:
        raise ValueError("results is empty: nothing to plot")
    figure = Figure(figsize=(10, 8), layout="constrained")
    axes = figure.subplots(2, 2, sharex=True).ravel()
    plotted = 0
    for axis, scenario in zip(axes, FIGURE_SCENARIOS, strict=True):
        for method, runs in runs_by_method(results).items():
            entries = [run.find(scenario.support, scenario.query, epsilon) for run in runs]
            if any(entry is None for entry in entries):
                continue
            curves = np.array(
                [e.accuracy_curve if metric == "accuracy" else e.loss_curve for e in entries if e]
            )
            mean, steps = curves.mean(axis=0), range(curves.shape[1])
            label = method if len(runs) == 1 else f"{method} (mean ± sd, {len(runs)} seeds)"
            axis.plot(steps, mean, marker="o", markersize=3, label=label,
                      color=method_color(method))  # fmt: skip
            if len(runs) > 1:  # spread across training seeds
                spread = curves.std(axis=0, ddof=1)
                axis.fill_between(steps, mean - spread, mean + spread, alpha=0.2,
                                  color=method_color(method), linewidth=0)  # fmt: skip
            plotted += 1
        axis.set_title(scenario.name)
        axis.set_xlabel("Gradient update step")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_ylabel("Top-1 accuracy (%)" if metric == "accuracy" else "Average loss")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    if plotted == 0:
        raise ValueError(
            f"no result has the scenarios of Figures 2-5 at epsilon={epsilon:g}; evaluate "
            "with that epsilon or pass epsilon= one of the evaluated radii"
        )
    first = results[0]
    name = "Top-1 accuracy" if metric == "accuracy" else "Average loss"
    figure.suptitle(
        title
        or f"{name} over the gradient update step, {first.ways}-way {first.shots}-shot"
        f"{' ' + first.dataset if first.dataset else ''}, ε = {epsilon:g} pixel levels "
        f"({epsilon:g}/255)"
    )
    return _save_png(figure, path)


def format_compact_table(results: Sequence[EvaluationResult], epsilon: float) -> str:
    """Only what was measured at ``epsilon``: one row per method and support scenario, the
    clean and the adversarial query (accuracy % ± 95% CI), no empty rows or columns.

    Example:
        >>> format_compact_table([], 2.0).splitlines()[0]
        '| Method | Support | Clean query | Adversarial query (ε = 2/255) |'
    """
    lines = [
        f"| Method | Support | Clean query | Adversarial query (ε = {epsilon:g}/255) |",
        "| --- | --- | --- | --- |",
    ]
    for result in results:
        for support in _supports(result.shots):
            cells = [result.find(support, query, epsilon) for query in ("clean", "adversarial")]
            if all(cell is None for cell in cells):
                continue
            values = [MISSING if c is None else f"{c.accuracy:.2f} ± {c.ci95:.2f}" for c in cells]
            lines.append(f"| {result.method} | {support.capitalize()} | {' | '.join(values)} |")
    return "\n".join(lines) + "\n"


def _save_png(figure: Figure, path: str | os.PathLike[str]) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return write_atomic(path, buffer.getvalue())


def plot_robustness(
    results: Sequence[EvaluationResult],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    mark: float | None = None,
) -> Path:
    """Accuracy against the attack radius, one line per method (95% CI bars; with several
    training seeds, their mean and sd bars), one panel per scenario (support set x query
    set). eps = 0 is drawn from Clean-Clean (no perturbation: every scenario is Clean-Clean
    there). ``mark`` draws a vertical line at one radius (the table's). Writes a PNG to
    ``path``.

    Example:
        >>> plot_robustness(results, "robustness_eps.png")  # doctest: +SKIP
    """
    if not results:
        raise ValueError("results is empty: nothing to plot")
    supports = _supports(results[0].shots)
    figure = Figure(figsize=(4.2 * len(supports), 7.5), layout="constrained")
    axes = figure.subplots(2, len(supports), sharex=True, sharey=True, squeeze=False)
    radii: set[float] = {0.0}
    by_method: dict[str, list[SeedSummary]] = {}
    for summary in summarise(results):
        by_method.setdefault(summary.method, []).append(summary)
    for row, query in enumerate(("clean", "adversarial")):
        for column, support in enumerate(supports):
            axis = axes[row][column]
            radii.update(_draw_robustness(axis, by_method, support, query))
            if mark is not None:
                axis.axvline(mark, color="black", linestyle=":", linewidth=1)
            axis.set_title(f"{support.capitalize()} support, {query} query")
            axis.set_xscale("symlog", base=2, linthresh=1)
            axis.grid(alpha=0.3)
            if row == 1:
                axis.set_xlabel(EPSILON_LABEL)
            if column == 0:
                axis.set_ylabel("Top-1 accuracy (%)")
    ticks = sorted(radii)
    for axis in axes.ravel():
        axis.set_xticks(ticks, [f"{t:g}" for t in ticks])
    handles, labels = axes[1][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    figure.suptitle(title or _robustness_title(results, mark))
    return _save_png(figure, path)


def _error_bar(summary: SeedSummary) -> float:
    """One run: the 95% CI of the test tasks; several: the sd across training seeds."""
    return summary.task_ci95 if len(summary.per_seed) == 1 else summary.std


def _robustness_points(
    summaries: Sequence[SeedSummary], support: str, query: str
) -> dict[float, tuple[float, float]]:
    """A method's ``{radius: (accuracy, error bar)}`` in one scenario, radius 0 from its
    Clean-Clean accuracy (empty if the method was not evaluated in that scenario)."""
    points = {
        s.epsilon: (s.mean, _error_bar(s))
        for s in summaries
        if (s.support, s.query) == (support, query)
    }
    clean = next((s for s in summaries if (s.support, s.query) == ("clean", "clean")), None)
    if points and 0.0 not in points and clean is not None:
        points[0.0] = (clean.mean, _error_bar(clean))
    return points


def _draw_robustness(
    axis: Any, by_method: Mapping[str, Sequence[SeedSummary]], support: str, query: str
) -> set[float]:
    """One panel's lines, one per method; returns the radii drawn."""
    radii: set[float] = set()
    for method, summaries in by_method.items():
        points = _robustness_points(summaries, support, query)
        if not points:
            continue
        xs = sorted(points)
        radii.update(xs)
        seeds = len(summaries[0].per_seed)
        axis.errorbar(
            xs, [points[x][0] for x in xs], yerr=[points[x][1] for x in xs],
            marker="o", markersize=4, capsize=3,
            label=method if seeds == 1 else f"{method} (mean ± sd, {seeds} seeds)",
            color=method_color(method),
        )  # fmt: skip
    return radii


def _robustness_title(results: Sequence[EvaluationResult], mark: float | None) -> str:
    first = results[0]
    attacks = sorted({a.split("(")[0] for r in results for a in r.attacks})
    return (
        f"Accuracy against the attack radius, {first.ways}-way {first.shots}-shot"
        f"{' ' + first.dataset if first.dataset else ''} ({', '.join(attacks)}, "
        f"protocol {first.protocol!r}, {first.num_tasks} test tasks)\n"
        + ("ε = 0 is Clean-Clean (nothing perturbed)"
           + ("; dotted line: the table's ε" if mark is not None else ""))
    )  # fmt: skip


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def _trained_epsilon(folder: Path, radii: set[float]) -> float:
    """The run's ``train.eps`` (the radius its validation score uses) if it logged it."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    trained = float(config["train"]["eps"])
    return trained if trained in radii else min(radii)


def plot_training(
    runs: Mapping[str, str | os.PathLike[str]],
    path: str | os.PathLike[str],
    *,
    epsilon: float | None = None,
    title: str | None = None,
) -> Path:
    """Training curves of several runs on one figure, one colour per method: the meta-loss and
    the query accuracy of the meta-batches (``metrics.csv``), and the clean and adversarial
    loss and accuracy of meta-validation (``validation.csv``, at ``epsilon`` when the run
    logged it, else at its ``train.eps``). ``runs`` maps a method's name to its run folder.

    Example:
        >>> plot_training({"ADML": "runs/digits-5w5s-adml"}, "training.png")  # doctest: +SKIP
    """
    if not runs:
        raise ValueError("runs is empty: nothing to plot")
    figure = Figure(figsize=(11, 8), layout="constrained")
    (train_loss, train_acc), (val_loss, val_acc) = figure.subplots(2, 2, sharex=True)
    splits: set[str] = set()
    for method, folder in runs.items():
        _plot_metrics(train_loss, train_acc, method, Path(folder))
        splits.update(_plot_validation(val_loss, val_acc, method, Path(folder), epsilon))
    train_loss.set_title("Meta-batches: meta-loss (ADML: sum of its two branches)")
    train_loss.set_ylabel("Meta-loss")
    train_acc.set_title("Meta-batches: query accuracy after adaptation")
    train_acc.set_ylabel("Accuracy (%)")
    where = f" ({', '.join(sorted(splits))} split)" if splits else ""
    val_loss.set_title(f"Meta-validation{where}: query loss")
    val_loss.set_ylabel("Cross-entropy")
    val_acc.set_title(f"Meta-validation{where}: query accuracy")
    val_acc.set_ylabel("Accuracy (%)")
    for axis in (train_loss, train_acc, val_loss, val_acc):
        axis.grid(alpha=0.3)
    if train_loss.lines:
        train_loss.legend(fontsize="small")
    if val_acc.lines:  # below the panels, where it hides no curve
        handles, labels = val_acc.get_legend_handles_labels()
        figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 4),
                      fontsize="small")  # fmt: skip
    for axis in (val_loss, val_acc):
        axis.set_xlabel("Meta-iteration")
    figure.suptitle(
        title or "Meta-training and meta-validation (after adaptation, against the iteration)"
    )
    return _save_png(figure, path)


def _plot_metrics(loss_axis: Any, accuracy_axis: Any, method: str, folder: Path) -> None:
    """A run's meta-loss and meta-batch query accuracy (``metrics.csv``)."""
    metrics = folder / "metrics.csv"
    if not metrics.exists():
        raise FileNotFoundError(f"{metrics} not found: is {folder} a run folder?")
    rows = _read_csv(metrics)
    iterations = [int(r["iteration"]) for r in rows]
    color = method_color(method)
    loss_axis.plot(iterations, [float(r["loss"]) for r in rows], color=color, label=method)
    accuracy_axis.plot(iterations, [100 * float(r["accuracy"]) for r in rows], color=color,
                       label=method)  # fmt: skip


def _plot_validation(
    loss_axis: Any, accuracy_axis: Any, method: str, folder: Path, epsilon: float | None
) -> set[str]:
    """A run's meta-validation loss and accuracy, clean and adversarial (``validation.csv``,
    at ``epsilon`` if logged, else at ``train.eps``); returns the splits validated on (none
    without the file)."""
    validation = folder / "validation.csv"
    if not validation.exists():
        return set()
    rows = _read_csv(validation)
    splits = {r["split"] for r in rows}
    radii = {float(r["epsilon"]) for r in rows}
    wanted = epsilon if epsilon in radii else _trained_epsilon(folder, radii)
    rows = [r for r in rows if float(r["epsilon"]) == wanted]
    iterations = [int(r["iteration"]) for r in rows]
    color = method_color(method)
    for query, style in (("clean", "-"), ("adversarial", "--")):
        label = f"{method}, {query} query" + (f" (ε = {wanted:g}/255)" if query != "clean" else "")
        loss_axis.plot(iterations, [float(r[f"{query}_loss"]) for r in rows], style,
                       color=color, marker="o", markersize=3, label=label)  # fmt: skip
        accuracy_axis.plot(iterations, [float(r[f"{query}_accuracy"]) for r in rows], style,
                           color=color, marker="o", markersize=3, label=label)  # fmt: skip
    return splits


class ResultsFileError(UserError, ValueError):
    """A results file that cannot be read (missing, not JSON, not evaluation results)."""


class ResultsExistError(UserError, RuntimeError):
    """A result would be replaced without ``--overwrite``."""


def refuse_overwrite(paths: Sequence[str | os.PathLike[str]], overwrite: bool) -> None:
    """Raise :class:`ResultsExistError` if any of ``paths`` exists, unless ``overwrite``."""
    existing = [str(path) for path in paths if Path(path).exists()]
    if existing and not overwrite:
        raise ResultsExistError(
            f"results already exist, {', '.join(map(repr, existing))}; pass --overwrite to replace "
            "them, or choose another output"
        )


def save_results(
    results: Sequence[EvaluationResult],
    path: str | os.PathLike[str],
    checkpoints: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """Write evaluation results as a JSON list (atomically); ``checkpoints`` (one per result:
    the evaluated checkpoint's iteration, digest, whether its run finished) go beside them."""
    payload = [result.to_dict() for result in results]
    for item, checkpoint in zip(payload, checkpoints or [], strict=False):
        item["checkpoint"] = checkpoint
    return write_atomic(path, json.dumps(payload, indent=1, ensure_ascii=False) + "\n")


def load_results(path: str | os.PathLike[str]) -> list[EvaluationResult]:
    """Read what :func:`save_results` wrote (a list, or a single result's dictionary)."""
    fix = "give the evaluation.json that `l2l-adversarial evaluate` wrote"
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultsFileError(
            f"results file is not valid JSON ({error}), {str(path)!r}; {fix}, or re-run it"
        ) from error
    items = data if isinstance(data, list) else [data]
    try:
        if not items or not all(isinstance(item, dict) for item in items):
            raise ValueError("expected a list of result dictionaries")
        return [
            EvaluationResult.from_dict({k: v for k, v in item.items() if k != "checkpoint"})
            for item in items
        ]
    except ValueError as error:
        raise ResultsFileError(
            f"results file holds no evaluation results ({error}), {str(path)!r}; {fix}"
        ) from error


def report_paths(
    results: Sequence[EvaluationResult],
    directory: str | os.PathLike[str],
    dataset: str,
    shots: int,
    training: bool = False,
) -> list[Path]:
    """The files :func:`write_report` writes: ``table{N}`` for the paper's tables, else
    ``{dataset}_{shots}shot``, as ``.md``, ``.json``, (with results) the loss, accuracy and
    robustness ``.png`` and (with ``training``) the training curves' ``.png``."""
    number = table_number(dataset, shots)
    stem = f"table{number}" if number is not None else f"{_dataset_key(dataset)}_{shots}shot"
    folder = Path(directory)
    names = [f"{stem}_{metric}.png" for metric in METRICS] + [f"{stem}_robustness_eps.png"]
    figures = [folder / name for name in names] if results else []
    if training:
        figures.append(folder / f"{stem}_training.png")
    return [folder / f"{stem}.md", folder / f"{stem}.json", *figures]


def write_report(
    results: Sequence[EvaluationResult],
    directory: str | os.PathLike[str],
    dataset: str,
    shots: int,
    *,
    epsilon: float = 2.0,
    training_runs: Mapping[str, str | os.PathLike[str]] | None = None,
    overwrite: bool = True,
) -> list[Path]:
    """Write the table (``.md``, ``.json``), the loss and accuracy figures at ``epsilon``, the
    robustness curves (``_robustness_eps.png``) and, given the methods' run folders
    (``training_runs``), the training curves (``_training.png``) to :func:`report_paths`; with
    ``overwrite=False`` refuse (:class:`ResultsExistError`) before writing anything if one
    exists."""
    paths = report_paths(results, directory, dataset, shots, training=bool(training_runs))
    refuse_overwrite(paths, overwrite)
    table = table_json(results, dataset, shots)
    write_atomic(paths[0], format_table(results, dataset, shots))
    write_atomic(paths[1], json.dumps(table, indent=1, ensure_ascii=False))
    if results:
        for metric, path in zip(METRICS, paths[2:4], strict=True):
            plot_curves(results, path, metric, epsilon=epsilon)
        plot_robustness(results, paths[4], mark=epsilon)
    if training_runs:
        plot_training(training_runs, paths[-1], epsilon=epsilon)
    return paths


def _group_results(
    files: Sequence[str | os.PathLike[str]],
) -> tuple[dict[tuple[str, int], list[EvaluationResult]], dict[tuple[str, int], dict[str, Path]]]:
    """The results of ``files`` by (dataset, shots), and the run folders of those that lie
    inside one (beside its ``metrics.csv``), by method; each file read under its folder's
    shared lock."""
    groups: dict[tuple[str, int], list[EvaluationResult]] = defaultdict(list)
    runs: dict[tuple[str, int], dict[str, Path]] = defaultdict(dict)
    for path in map(Path, files):
        with reader_lock(path.parent):
            loaded = load_results(path)
        for result in loaded:
            key = (result.dataset or "unknown", result.shots)
            groups[key].append(result)
            if (path.parent / "metrics.csv").is_file():  # results inside a run folder
                runs[key][result.method] = path.parent
    return groups, runs


def _check_figure_epsilon(
    results: Sequence[EvaluationResult], epsilon: float, files: Sequence[str | os.PathLike[str]]
) -> None:
    """Raise :class:`ResultsFileError` unless a result has a figure's scenario at
    ``epsilon`` (``--epsilon``), before any file is written."""
    if not any(r.find(s.support, s.query, epsilon) for r in results for s in FIGURE_SCENARIOS):
        radii = sorted({entry.epsilon for result in results for entry in result.scenarios})
        raise ResultsFileError(
            f"--epsilon {epsilon:g} is not a radius of the results in "
            f"{', '.join(repr(os.fspath(f)) for f in files)} (evaluated: "
            f"{', '.join(f'{radius:g}' for radius in radii)}); pass --epsilon one of those"
        )


def report_results(
    files: Sequence[str | os.PathLike[str]],
    directory: str | os.PathLike[str] = "report",
    *,
    epsilon: float = 2.0,
    overwrite: bool = False,
) -> list[Path]:
    """The ``report`` command: one table per dataset and shots of the results in ``files``,
    printed and written with its figures (:func:`write_report`, the training curves too for
    results inside run folders) into ``directory``; refuses before writing anything if a
    file exists, unless ``overwrite``. Returns the files written."""
    groups, runs = _group_results(files)
    tables = {}
    for (dataset, shots), group in sorted(groups.items()):
        _check_figure_epsilon(group, epsilon, files)
        try:
            tables[(dataset, shots)] = format_table(group, dataset, shots)
        except ValueError as error:
            raise ResultsFileError(
                f"these results do not make one table ({error}), in "
                f"{', '.join(repr(os.fspath(f)) for f in files)}; report each run's results once"
            ) from error
    outputs = [
        p
        for (d, s), g in groups.items()
        for p in report_paths(g, directory, d, s, training=bool(runs[d, s]))
    ]
    refuse_overwrite(outputs, overwrite)  # before writing any file
    written = []
    for (dataset, shots), table in tables.items():
        print(table)
        paths = write_report(groups[(dataset, shots)], directory, dataset, shots,
                             epsilon=epsilon, training_runs=runs[dataset, shots])  # fmt: skip
        for path in paths:
            print(f"wrote {path}")
        written += paths
    return written
