"""Aggregation over training seeds and the paired comparison, against hand computations."""

import itertools
import math

import numpy as np
import pytest

from l2l_adversarial.app.seeds import compare, compare_all, summarise
from l2l_adversarial.errors import UserError
from l2l_adversarial.evaluation import EvaluationResult, ScenarioResult


def run(method, seed, accuracies, *, ci95=1.0, tasks=None, evaluation_seed=2018):
    entries = [
        ScenarioResult(support, query, 2.0, float(np.mean(values)), ci95, 0.0, [], [], values)
        for (support, query), values in accuracies.items()
    ]
    count = tasks or len(next(iter(accuracies.values())))
    return EvaluationResult(method, 5, 1, count, "paper", evaluation_seed, "", 1 / 255, [],
                            None, entries, training_seed=seed)  # fmt: skip


CA = ("clean", "adversarial")
CC = ("clean", "clean")


def test_summary_matches_hand_computation():
    runs = [
        run("ADML", 1, {CA: [60.0, 80.0], CC: [90.0, 70.0]}, ci95=2.0),
        run("ADML", 0, {CA: [40.0, 50.0], CC: [80.0, 80.0]}, ci95=4.0),
        run("ADML", 2, {CA: [70.0, 70.0], CC: [100.0, 60.0]}, ci95=3.0),
    ]
    by_key = {(s.method, s.support, s.query): s for s in summarise(runs)}
    adversarial = by_key[("ADML", *CA)]
    # per-seed accuracies in seed order: 45, 70, 70 -> mean 61.667, sample std sqrt(208.33)
    assert adversarial.seeds == [0, 1, 2]
    assert adversarial.per_seed == [45.0, 70.0, 70.0]
    assert adversarial.mean == pytest.approx(185 / 3)
    hand_variance = ((45 - 185 / 3) ** 2 + 2 * (70 - 185 / 3) ** 2) / 2
    assert adversarial.std == pytest.approx(math.sqrt(hand_variance))
    assert adversarial.task_ci95 == pytest.approx(3.0)
    assert by_key[("ADML", *CC)].per_seed == [80.0, 80.0, 80.0]
    assert by_key[("ADML", *CC)].std == 0.0


def test_one_seed_has_no_spread():
    (summary,) = summarise([run("MAML", 0, {CA: [50.0, 70.0]})])
    assert summary.mean == 60.0 and math.isnan(summary.std)


def test_paired_difference_and_exact_bootstrap_distribution():
    first = [run("ADML", 0, {CA: [80.0, 60.0]}), run("ADML", 1, {CA: [70.0, 90.0]})]
    second = [run("MAML", 0, {CA: [50.0, 60.0]}), run("MAML", 1, {CA: [40.0, 50.0]})]
    comparison = compare(first, second, *CA, 2.0, resamples=40000, seed=1)
    differences = np.array([[30.0, 0.0], [30.0, 40.0]])  # ADML - MAML, seed x task
    assert comparison.difference == pytest.approx(differences.mean())  # 25
    # every (seed draw, task draw) of the bootstrap is equally likely: 4 x 4 outcomes
    outcomes = sorted(
        differences[np.ix_(s, t)].mean()
        for s in itertools.product(range(2), repeat=2)
        for t in itertools.product(range(2), repeat=2)
    )
    # each extreme has probability 1/16 > 2.5 %, so the 95 % interval spans all outcomes
    assert (comparison.low, comparison.high) == (min(outcomes), max(outcomes)) == (0.0, 40.0)
    assert comparison.seeds == 2 and comparison.tasks == 2 and not comparison.significant


def test_identical_methods_differ_by_nothing():
    accuracies = {CA: [20.0, 40.0, 60.0, 80.0]}
    comparison = compare([run("A", 0, accuracies)], [run("B", 0, accuracies)], *CA, 2.0)
    assert (comparison.difference, comparison.low, comparison.high) == (0.0, 0.0, 0.0)
    assert not comparison.significant


def test_compare_all_covers_every_pair_and_common_scenario():
    runs = [
        run("MAML", 0, {CA: [50.0, 50.0], CC: [90.0, 90.0]}),
        run("ADML", 0, {CA: [70.0, 80.0]}),
        run("MAML-AD", 0, {CA: [60.0, 60.0]}),
    ]
    pairs = [(c.first, c.second, c.query) for c in compare_all(runs, resamples=100)]
    assert pairs == [
        ("MAML", "ADML", "adversarial"),
        ("MAML", "MAML-AD", "adversarial"),
        ("ADML", "MAML-AD", "adversarial"),
    ]


@pytest.mark.parametrize(
    "runs, message",
    [
        ([run("A", 0, {CA: [1.0]}), run("A", 0, {CA: [2.0]})], "training seed"),
        (
            [run("A", 0, {CA: [1.0]}), run("A", 1, {CA: [2.0]}, evaluation_seed=7)],
            "different test tasks",
        ),  # fmt: skip
    ],
)
def test_inconsistent_runs_are_refused(runs, message):
    with pytest.raises(UserError, match=message):
        summarise(runs)


def test_unequal_seed_counts_cannot_be_paired():
    with pytest.raises(UserError, match="same number of training seeds"):
        compare([run("A", 0, {CA: [1.0]}), run("A", 1, {CA: [1.0]})], [run("B", 0, {CA: [1.0]})],
                *CA, 2.0)  # fmt: skip


def test_figures_draw_the_spread_across_seeds(tmp_path):
    from l2l_adversarial.app.report import plot_curves, plot_robustness

    def curved(method, seed, level):
        result = run(method, seed, {CA: [level, level + 10.0], CC: [90.0, 80.0]})
        for entry in result.scenarios:
            entry.accuracy_curve = [20.0, entry.accuracy]
            entry.loss_curve = [1.6, 1.0]
        return result

    results = [curved(m, s, 50.0 + 5 * s) for m in ("MAML", "ADML") for s in (0, 1)]
    paths = [plot_robustness(results, tmp_path / "robust_eps.png"),
             plot_curves(results, tmp_path / "curves.png", epsilon=2.0)]  # fmt: skip
    assert all(path.stat().st_size > 10_000 for path in paths)
