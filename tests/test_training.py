"""Training loop: exact resume after a kill or Ctrl-C, safe run folders, safe checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_factories import SyntheticTasks, digits_config

from l2l_adversarial.app.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from l2l_adversarial.app.training import CHECKPOINT, RunFolderError, build_learner, train


def final_parameters(learner: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in learner.parameters()]


class Killed(Exception):
    """Stands in for the process dying (no checkpoint is written on the way out)."""


def stop_at(iteration: int, error: type[BaseException]):  # noqa: ANN201
    def hook(current: int) -> None:
        if current == iteration:
            raise error()

    return hook


@pytest.mark.parametrize(
    ("method", "train_options"),
    [
        ("adml", {"meta_update": "sequential", "attack": "ffgsm"}),
        ("maml-ad", {"attack": "pgd", "pgd_steps": 2}),
        ("matching-nets", {}),
    ],
)
def test_run_killed_and_resumed_matches_uninterrupted_run(
    tmp_path: Path, method: str, train_options: dict
) -> None:
    cfg = digits_config(method, **train_options)
    reference = final_parameters(train(cfg, tmp_path / "a", SyntheticTasks(), progress=False))

    with pytest.raises(Killed):  # dies during iteration 3: the last checkpoint is iteration 2
        train(
            cfg, tmp_path / "b", SyntheticTasks(), progress=False, on_iteration=stop_at(3, Killed)
        )
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT, kind="train")["iteration"] == 2
    torch.manual_seed(12345)  # resuming must not depend on the RNG state of the new process
    resumed = final_parameters(
        train(cfg, tmp_path / "b", SyntheticTasks(), resume=True, progress=False)
    )
    for a, b in zip(reference, resumed, strict=True):
        assert torch.equal(a, b)
    rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == [
        str(i) for i in range(1, 7)
    ]  # no duplicated rows


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_identically(tmp_path: Path) -> None:
    cfg = digits_config("aq")
    reference = final_parameters(train(cfg, tmp_path / "a", SyntheticTasks(), progress=False))
    with pytest.raises(KeyboardInterrupt, match="continue with --resume"):
        train(
            cfg,
            tmp_path / "b",
            SyntheticTasks(),
            progress=False,
            on_iteration=stop_at(3, KeyboardInterrupt),
        )
    assert load_checkpoint(tmp_path / "b" / CHECKPOINT, kind="train")["iteration"] == 3
    resumed = final_parameters(
        train(cfg, tmp_path / "b", SyntheticTasks(), resume=True, progress=False)
    )
    for a, b in zip(reference, resumed, strict=True):
        assert torch.equal(a, b)


def test_existing_results_are_never_overwritten_unless_asked(tmp_path: Path) -> None:
    cfg = digits_config("maml", iterations=2)
    train(cfg, tmp_path, SyntheticTasks(), progress=False)
    before = (tmp_path / CHECKPOINT).read_bytes()
    with pytest.raises(RunFolderError, match="--resume.*--overwrite"):
        train(cfg, tmp_path, SyntheticTasks(), progress=False)
    assert (tmp_path / CHECKPOINT).read_bytes() == before
    train(cfg, tmp_path, SyntheticTasks(seed=1), overwrite=True, progress=False)
    assert (tmp_path / CHECKPOINT).read_bytes() != before


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path: Path) -> None:
    train(digits_config("maml", iterations=2), tmp_path / "run", SyntheticTasks(), progress=False)
    with pytest.raises(CheckpointError, match="belongs to a different run"):
        train(
            digits_config("adml", iterations=4),
            tmp_path / "run",
            SyntheticTasks(),
            resume=True,
            progress=False,
        )
    checkpoint = tmp_path / "run" / CHECKPOINT
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # truncated
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(checkpoint, kind="train")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(
            digits_config("maml"), tmp_path / "empty", SyntheticTasks(), resume=True, progress=False
        )


def test_checkpoints_refuse_arbitrary_pickled_objects(tmp_path: Path) -> None:
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):  # noqa: ANN204
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    torch.save({"format": "l2l-adversarial-checkpoint", "payload": Exploit()}, path)
    with pytest.raises(CheckpointError, match="corrupt or not an l2l-adversarial checkpoint"):
        load_checkpoint(path, kind="train")
    assert not marker.exists()


def test_failed_write_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"iteration": 1}, kind="train")

    def broken_save(obj: object, file: object) -> None:
        file.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"iteration": 2}, kind="train")
    monkeypatch.undo()
    assert load_checkpoint(path, kind="train")["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


@pytest.mark.parametrize(
    ("device", "setting", "expected"),
    [
        ("cpu", "null", True),
        ("cpu", "false", False),
        ("cuda", "null", False),
        ("cuda", "true", True),
    ],
)
def test_channels_last_follows_the_config_and_defaults_to_the_cpu(
    device: str, setting: str, expected: bool
) -> None:
    cfg = digits_config(channels_last=setting)
    cfg["device"] = device  # build_learner reads the name only; no GPU is needed
    for method in ("maml", "adml", "maml-ad", "aq"):
        cfg["method"] = method
        learner = build_learner(cfg, in_channels=1, image_size=16)
        assert learner.functional.channels_last is expected
