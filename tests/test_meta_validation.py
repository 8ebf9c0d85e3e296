"""Meta-validation during training: rows, the best checkpoint, exact resume, TensorBoard."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from data_factories import SyntheticTasks, write_mini_imagenet_cache
from data_factories import digits_config as config
from test_training import Killed, final_parameters, stop_at

from l2l_adversarial.app.checkpoint import load_checkpoint
from l2l_adversarial.app.cli import main
from l2l_adversarial.app.config import ConfigError
from l2l_adversarial.app.meta_validation import BEST_CHECKPOINT, VALIDATION_LOG, MetaValidator
from l2l_adversarial.app.runs import evaluate_run, load_trained_learner
from l2l_adversarial.app.training import train
from l2l_adversarial.evaluation import Scenario, evaluate, few_shot_learner

VALIDATION = [SyntheticTasks(seed=7)[i] for i in range(4)]


def rows(run: Path) -> list[dict[str, str]]:
    with (run / VALIDATION_LOG).open(newline="") as file:
        return list(csv.DictReader(file))


def run_with_validation(run: Path, cfg: dict, **options: object) -> torch.nn.Module:
    monitor = MetaValidator(cfg, VALIDATION, split="validation", epsilons=[1.0, 8.0])
    return train(cfg, run, SyntheticTasks(), progress=False, monitor=monitor, **options)  # type: ignore[arg-type]


def test_rows_match_an_independent_evaluation_and_best_is_the_highest_score(
    tmp_path: Path,
) -> None:
    cfg = config("adml", validate_every=2, eps=4)
    cfg["evaluate"]["adaptation_steps"] = 2
    learner = run_with_validation(tmp_path, cfg)
    logged = rows(tmp_path)
    assert [(int(r["iteration"]), float(r["epsilon"])) for r in logged] == [
        (i, e) for i in (2, 4, 6) for e in (1.0, 4.0, 8.0)
    ]  # every radius asked for, and train.eps, at every validation and the last iteration
    final = evaluate(
        few_shot_learner(learner, cfg["evaluate"]["inner_lr"], 2),
        VALIDATION,
        method="ADML",
        epsilons=[4.0],
        scenarios=[Scenario(0.0, 0.0), Scenario(0.0, 1.0)],
        seed=cfg["evaluate"]["seed"],
    )
    last = next(r for r in logged if r["iteration"] == "6" and float(r["epsilon"]) == 4.0)
    assert float(last["clean_accuracy"]) == pytest.approx(final.scenarios[0].accuracy, abs=1e-3)
    assert float(last["adversarial_accuracy"]) == pytest.approx(
        final.scenarios[1].accuracy, abs=1e-3
    )
    scored = [r for r in logged if float(r["epsilon"]) == 4.0]
    best = max(scored, key=lambda r: float(r["score"]))  # the first of equal scores wins
    state = load_checkpoint(tmp_path / BEST_CHECKPOINT, kind="train")
    assert state["iteration"] == int(best["iteration"])
    assert state["validation"]["score"] == pytest.approx(float(best["score"]))
    if best["iteration"] == "6":
        for name, value in learner.state_dict().items():
            assert torch.equal(state["learner"][name], value)


def test_best_checkpoint_and_rows_survive_a_kill_and_resume(tmp_path: Path) -> None:
    cfg = config("maml-ad", validate_every=1, checkpoint_every=3)
    cfg["evaluate"]["adaptation_steps"] = 1
    reference = final_parameters(run_with_validation(tmp_path / "a", cfg))
    with pytest.raises(Killed):  # dies after iteration 5: checkpoint at 3, rows up to 5
        run_with_validation(tmp_path / "b", cfg, on_iteration=stop_at(5, Killed))
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt", kind="train")["iteration"] == 3
    assert int(rows(tmp_path / "b")[-1]["iteration"]) == 5
    torch.manual_seed(999)
    resumed = run_with_validation(tmp_path / "b", cfg, resume=True)
    for a, b in zip(reference, final_parameters(resumed), strict=True):
        assert torch.equal(a, b)
    assert rows(tmp_path / "a") == rows(tmp_path / "b")  # no duplicated or missing row
    best_a = load_checkpoint(tmp_path / "a" / BEST_CHECKPOINT, kind="train")
    best_b = load_checkpoint(tmp_path / "b" / BEST_CHECKPOINT, kind="train")
    assert best_a["iteration"] == best_b["iteration"]
    assert best_a["validation"] == best_b["validation"]
    for name, value in best_a["learner"].items():
        assert torch.equal(best_b["learner"][name], value)


def test_evaluate_loads_the_best_or_the_last_checkpoint(tmp_path: Path) -> None:
    cfg = config("maml", validate_every=2)
    cfg["evaluate"]["tasks"], cfg["evaluate"]["adaptation_steps"] = 2, 1
    run_with_validation(tmp_path, cfg)
    tasks = [SyntheticTasks()[0]]
    best, info = load_trained_learner(tmp_path, cfg, tasks, "best")
    saved = load_checkpoint(tmp_path / BEST_CHECKPOINT, kind="train")
    assert info["iteration"] == saved["iteration"]
    for name, value in best.state_dict().items():
        assert torch.equal(saved["learner"][name], value)
    (tmp_path / BEST_CHECKPOINT).unlink()
    with pytest.raises(Exception, match="--checkpoint last"):
        evaluate_run(tmp_path, cfg, progress=False, checkpoint="best")


def test_tensorboard_logs_train_and_validation_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config("maml", validate_every=3, tensorboard=True)
    cfg["evaluate"]["adaptation_steps"] = 1
    run_with_validation(tmp_path, cfg)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "validation/adversarial_accuracy"} <= tags
    assert [e.step for e in events.Scalars("validation/score")] == [3, 6]
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 7))


def test_tensorboard_without_the_package_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match="pip install"):
        MetaValidator(config("maml", tensorboard=True), VALIDATION, split="validation")


def test_a_missing_validation_split_names_the_way_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_mini_imagenet_cache(
        tmp_path / "data", "train", num_classes=6, images_per_class=4, image_size=16
    )
    argv = ["train", "--run-dir", str(tmp_path / "run"), "--quiet", "-o", "dataset.strict=false",
            "-o", f"dataset.root={tmp_path / 'data'}", "-o", "train.iterations=1",
            "-o", "task.query_shots=2"]  # fmt: skip
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "mini-imagenet-cache-validation.pkl" in error and "train.validate_every=null" in error
