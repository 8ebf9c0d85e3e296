"""The quickstart: its radius rule, determinism for its seed, the thread count, its figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from l2l_adversarial.app.cli import main
from l2l_adversarial.app.quickstart import EPS_RULE_RATIO, choose_epsilon

TINY = ["--iterations", "2", "--tasks", "2", "--quiet", "-o", "model.hidden=4",
        "-o", "train.adaptation_steps=1", "-o", "evaluate.adaptation_steps=1",
        "-o", "train.validation_tasks=2", "-o", "train.validate_every=1"]  # fmt: skip
HEADER = (
    "iteration,split,epsilon,clean_accuracy,clean_ci95,clean_loss,adversarial_accuracy,"
    "adversarial_ci95,adversarial_loss,score\n"
)


def test_radius_rule_reads_the_last_validation(tmp_path: Path) -> None:
    log = tmp_path / "validation.csv"
    rows = [(10, 2.0, 90.0, 10.0), (20, 2.0, 100.0, 95.0), (20, 8.0, 100.0, 91.0),
            (20, 4.0, 100.0, 89.0), (20, 16.0, 100.0, 50.0)]  # fmt: skip
    log.write_text(HEADER + "".join(f"{i},train,{e},{c},1,1,{a},1,1,1\n" for i, e, c, a in rows))
    epsilon, row = choose_epsilon(log)  # iteration 10 is ignored; 4 is the first below 90 %
    assert EPS_RULE_RATIO == 0.9
    assert (epsilon, row["adversarial_accuracy"]) == (4.0, "89.0")
    log.write_text(HEADER + "20,train,2.0,100,1,1,99,1,1,1\n20,train,32.0,100,1,1,95,1,1,1\n")
    assert choose_epsilon(log)[0] == 32.0  # none breaks MAML: the largest radius


def test_quickstart_is_deterministic_for_its_seed_and_writes_its_figures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outputs = []
    for name in ("a", "b"):
        assert main(["quickstart", "--output", str(tmp_path / name), *TINY]) == 0
        outputs.append(capsys.readouterr().out)
    first, second = (json.loads((tmp_path / n / "evaluation.json").read_text()) for n in "ab")
    assert first == second
    summaries = [json.loads((tmp_path / n / "quickstart.json").read_text()) for n in "ab"]
    assert summaries[0]["threads"] == summaries[1]["threads"] == 1
    assert summaries[0]["epsilon"] == summaries[1]["epsilon"]
    assert [r["method"] for r in first] == ["MAML", "MAML-AD", "ADML"]
    epsilon = summaries[0]["epsilon"]
    assert f"ε = {epsilon:g} pixel levels" in outputs[0] and "1 torch thread" in outputs[0]
    assert "| MAML-AD | 40% |" in outputs[0] and "Matching Nets" not in outputs[0]
    report = tmp_path / "a" / "report"
    for name in ("digits_5shot_robustness_eps.png", "digits_5shot_training.png"):
        assert (report / name).stat().st_size > 20000
        assert str(report / name) in outputs[0]
    for method in ("maml", "maml-ad", "adml"):
        assert (tmp_path / "a" / method / "best.pt").is_file()
