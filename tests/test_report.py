"""Tables and figures: the paper's numbers next to ours, JSON round trips, atomic files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from matplotlib.axes import Axes

from l2l_adversarial import MLP, Task
from l2l_adversarial.app import report as report_module
from l2l_adversarial.app.report import (
    format_compact_table,
    format_table,
    load_paper_tables,
    load_results,
    method_color,
    plot_curves,
    plot_robustness,
    plot_training,
    save_results,
    table_json,
    table_number,
    write_report,
)
from l2l_adversarial.evaluation import (
    EvaluationResult,
    GradientLearner,
    ScenarioResult,
    evaluate,
    paper_scenarios,
)

SHIPPED = (
    Path(__file__).resolve().parents[1]
    / "l2l_adversarial"
    / "app"
    / "resources"
    / "paper_tables.json"
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_result(method: str, shots: int, base: float, dataset: str | None = "MiniImageNet"):
    """A hand-made result: accuracy ``base + i`` for the i-th (epsilon, scenario)."""
    entries = []
    for e, epsilon in enumerate((2.0, 0.2)):
        for i, scenario in enumerate(paper_scenarios(shots)):
            accuracy = base + 10 * e + i
            entries.append(
                ScenarioResult(
                    support=scenario.support,
                    query=scenario.query,
                    epsilon=epsilon,
                    accuracy=accuracy,
                    ci95=1.0 + i / 100,
                    loss=1.0,
                    accuracy_curve=[20.0, accuracy - 5, accuracy],
                    loss_curve=[1.6, 1.2, 1.0 + i / 10],
                    task_accuracies=[accuracy],
                )
            )
    return EvaluationResult(
        method=method,
        ways=5,
        shots=shots,
        num_tasks=1,
        protocol="paper",
        seed=0,
        learner="GradientLearner(lr=0.01, steps=2)",
        pixel_scale=1 / 255,
        attacks=["FGSM(eps=0.00784314)", "FGSM(eps=0.000784314)"],
        dataset=dataset,
        scenarios=entries,
    )


def markdown_rows(markdown: str) -> dict[tuple[str, str], list[str]]:
    """(method, support) -> the table's cells, splitting on unescaped pipes."""
    rows = {}
    for line in markdown.splitlines():
        if not line.startswith("| ") or line.startswith("| Method") or "---" in line:
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows[cells[0], cells[1]] = cells[2:]
    return rows


def test_shipped_tables_are_the_papers():
    shipped = json.loads(SHIPPED.read_text(encoding="utf-8"))
    assert load_paper_tables() == shipped
    assert len(shipped) == 160
    assert {e["table"] for e in shipped} == {1, 2, 3, 4}


@pytest.mark.parametrize(
    ("dataset", "shots", "number"),
    [("MiniImageNet", 1, 1), ("MiniImageNet", 5, 2), ("CIFAR100", 1, 3), ("cifar-100", 5, 4)],
)
def test_table_numbers(dataset, shots, number):
    assert table_number(dataset, shots) == number
    assert table_number("Omniglot", shots) is None


@pytest.mark.parametrize(
    ("dataset", "shots", "number"), [("MiniImageNet", 5, 2), ("CIFAR100", 1, 3)]
)
def test_markdown_holds_the_right_tables_paper_numbers(dataset, shots, number):
    shipped = json.loads(SHIPPED.read_text(encoding="utf-8"))
    markdown = format_table([], dataset, shots)
    assert markdown.startswith(f"### Table {number}. ")
    rows = markdown_rows(markdown)
    columns = [(2, "clean"), (2, "adversarial"), (0.2, "clean"), (0.2, "adversarial")]
    mine = [e for e in shipped if e["table"] == number]
    assert mine
    for e in mine:
        cell = rows[e["method"], e["support"].capitalize()][
            columns.index((e["epsilon"], e["query"]))
        ]
        assert cell == f"— \\| {e['accuracy']:.2f} ± {e['ci95']:.2f}"
    others = {f"{e['accuracy']:.2f} ± {e['ci95']:.2f}" for e in shipped if e["table"] != number}
    others -= {f"{e['accuracy']:.2f} ± {e['ci95']:.2f}" for e in mine}
    assert not any(value in markdown for value in others)


def test_markdown_puts_ours_next_to_the_papers():
    results = [fake_result("ADML", 5, base=50.0), fake_result("AQ", 5, base=30.0)]
    rows = markdown_rows(format_table(results, "MiniImageNet", 5))
    # ADML, "40%" support, eps=2, clean query: scenario index 2 -> 52.00 ± 1.02; paper 58.12 ± 0.90
    assert rows["ADML", "40%"][0] == "52.00 ± 1.02 \\| 58.12 ± 0.90"
    # eps=0.2, adversarial query, adversarial support: index 5 at e=1 -> 65.00 ± 1.05
    assert rows["ADML", "Adversarial"][3] == "65.00 ± 1.05 \\| 54.47 ± 0.93"
    assert rows["AQ", "Clean"][0] == "30.00 ± 1.00 \\| —"  # not in the paper
    assert rows["MAML", "Clean"][0] == "— \\| 61.45 ± 0.91"  # not run by us
    assert list(dict.fromkeys(m for m, _ in rows)) == [
        "MAML",
        "MAML-AD",
        "ADML",
        "Matching Nets",
        "AQ",
    ]


def test_table_json_round_trips_and_matches_markdown(tmp_path):
    results = [fake_result("MAML", 1, base=40.0)]
    table = table_json(results, "MiniImageNet", 1)
    assert json.loads(json.dumps(table)) == table
    assert table["table"] == 1 and table["shots"] == 1 and table["ways"] == 5
    entry = next(
        e
        for e in table["entries"]
        if (e["method"], e["support"], e["epsilon"], e["query"])
        == ("MAML", "adversarial", 2.0, "adversarial")
    )
    assert entry["ours"] == {"accuracy": 43.0, "ci95": 1.03}
    assert entry["paper"] == {"accuracy": 30.73, "ci95": 1.66}
    paths = write_report(results, tmp_path / "out", "MiniImageNet", 1)
    assert [p.name for p in paths] == [
        "table1.md",
        "table1.json",
        "table1_accuracy.png",
        "table1_loss.png",
        "table1_robustness_eps.png",
    ]
    assert json.loads((tmp_path / "out" / "table1.json").read_text(encoding="utf-8")) == table
    assert (tmp_path / "out" / "table1.md").read_text(encoding="utf-8") == format_table(
        results, "MiniImageNet", 1
    )


def test_results_round_trip_through_json_files(tmp_path):
    results = [fake_result("ADML", 5, base=50.0), fake_result("MAML", 5, base=40.0, dataset=None)]
    path = save_results(results, tmp_path / "results.json")
    assert load_results(path) == results
    (tmp_path / "broken.json").write_text("[{", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.json"):
        load_results(tmp_path / "broken.json")


def test_plots_are_png_files(tmp_path):
    results = [fake_result("ADML", 1, base=50.0), fake_result("MAML", 1, base=40.0)]
    for metric in ("accuracy", "loss"):
        path = plot_curves(results, tmp_path / f"{metric}.png", metric)
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.png", "loss.png"]
    with pytest.raises(ValueError, match="metric"):
        plot_curves(results, tmp_path / "x.png", "top5")
    with pytest.raises(ValueError, match="epsilon=8"):
        plot_curves(results, tmp_path / "x.png", epsilon=8.0)
    assert not (tmp_path / "x.png").exists()


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report_module.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        save_results([fake_result("ADML", 1, base=50.0)], tmp_path / "results.json")
    assert list(tmp_path.iterdir()) == []


def test_inconsistent_results_are_rejected():
    with pytest.raises(ValueError, match="1-shot, the table 5-shot"):
        format_table([fake_result("ADML", 1, base=50.0)], "MiniImageNet", 5)
    with pytest.raises(ValueError, match="two results for method 'ADML'"):
        format_table(
            [fake_result("ADML", 1, 50.0), fake_result("ADML", 1, 40.0)], "MiniImageNet", 1
        )
    with pytest.raises(ValueError, match="on 'MiniImageNet', the table on 'CIFAR100'"):
        table_json([fake_result("ADML", 1, base=50.0)], "CIFAR100", 1)


def test_report_of_a_real_evaluation(tmp_path):
    torch.manual_seed(0)
    tasks = [
        Task(torch.rand(5, 6), torch.arange(5), torch.rand(10, 6), torch.arange(5).repeat(2))
        for _ in range(2)
    ]
    result = evaluate(
        GradientLearner(MLP(6, 5, hidden=(8,)), steps=3), tasks, method="ADML", dataset="CIFAR100"
    )
    paths = write_report([result], tmp_path, "CIFAR100", 1)
    assert all(p.stat().st_size > 0 for p in paths)
    rows = markdown_rows((tmp_path / "table3.md").read_text(encoding="utf-8"))
    clean = result.find("clean", "clean", 2.0)
    assert clean is not None
    assert rows["ADML", "Clean"][0] == f"{clean.accuracy:.2f} ± {clean.ci95:.2f} \\| 55.70 ± 2.00"


def test_compact_table_has_only_the_measured_rows_and_columns():
    results = [fake_result("MAML", 5, base=40.0), fake_result("ADML", 5, base=50.0)]
    lines = format_compact_table(results, 2.0).splitlines()
    assert lines[0] == "| Method | Support | Clean query | Adversarial query (ε = 2/255) |"
    body = [line.split(" | ") for line in lines[2:]]
    assert [(row[0].strip("| "), row[1]) for row in body] == [
        (m, s) for m in ("MAML", "ADML") for s in ("Clean", "40%", "Adversarial")
    ]  # no MAML-AD or Matching Nets rows of dashes
    adml_40_adversarial = results[1].find("40%", "adversarial", 2.0)
    assert adml_40_adversarial is not None
    assert body[4][3].rstrip(" |") == f"{adml_40_adversarial.accuracy:.2f} ± 1.03"
    assert len(format_compact_table(results, 8.0).splitlines()) == 2  # nothing measured at 8


def test_robustness_figure_and_method_colours(tmp_path, monkeypatch):
    drawn: list[tuple[str, str, list[float]]] = []
    original = Axes.errorbar

    def record(self, x, y, *args, **kwargs):
        drawn.append((kwargs["label"], kwargs["color"], list(x)))
        return original(self, x, y, *args, **kwargs)

    monkeypatch.setattr(Axes, "errorbar", record)
    results = [fake_result("MAML", 1, base=40.0), fake_result("ADML", 1, base=50.0)]
    path = plot_robustness(results, tmp_path / "robustness_eps.png", mark=2.0)
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert len(drawn) == 2 * 4  # two methods x four 1-shot scenarios
    assert {(label, color) for label, color, _ in drawn} == {
        ("MAML", method_color("MAML")),
        ("ADML", method_color("ADML")),
    }
    assert all(x == [0.0, 0.2, 2.0] for _, _, x in drawn)  # eps 0 drawn from Clean-Clean
    assert len({method_color(m) for m in ("MAML", "MAML-AD", "ADML", "Matching Nets")}) == 4


def test_training_figure_reads_metrics_and_validation_logs(tmp_path):
    for method, offset in (("maml", 0.0), ("adml", 0.1)):
        run = tmp_path / method
        run.mkdir()
        (run / "config.yaml").write_text("train:\n  eps: 4.0\n")
        (run / "metrics.csv").write_text(
            "iteration,loss,accuracy,seconds\n"
            + "".join(f"{i},{1.5 - 0.1 * i + offset},{0.2 + 0.05 * i},{i}\n" for i in range(1, 9))
        )
        (run / "validation.csv").write_text(
            "iteration,split,epsilon,clean_accuracy,clean_ci95,clean_loss,adversarial_accuracy,"
            "adversarial_ci95,adversarial_loss,score\n"
            + "".join(f"{i},train,{e},{60 + i},1,1.0,{50 + i - e},1,1.2,{55 + i}\n"
                      for i in (4, 8) for e in (4.0, 16.0))
        )  # fmt: skip
    path = plot_training({"MAML": tmp_path / "maml", "ADML": tmp_path / "adml"},
                         tmp_path / "training.png", epsilon=16.0)  # fmt: skip
    assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 20000
    with pytest.raises(FileNotFoundError, match="metrics.csv"):
        plot_training({"MAML": tmp_path / "missing"}, tmp_path / "x.png")


def test_report_writes_robustness_and_training_figures_for_run_folders(tmp_path):
    results = [fake_result("ADML", 1, base=50.0, dataset="CIFAR100")]
    run = tmp_path / "adml"
    run.mkdir()
    (run / "metrics.csv").write_text(
        "iteration,loss,accuracy,seconds\n1,1.0,0.5,0.1\n2,0.9,0.6,0.2\n"
    )
    paths = write_report(results, tmp_path / "report", "CIFAR100", 1, training_runs={"ADML": run})
    names = {p.name for p in paths}
    assert {"table3_robustness_eps.png", "table3_training.png"} <= names
