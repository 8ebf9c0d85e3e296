"""Every bad input on the command line ends with status 2 and one line ``error: what, where;
how to fix`` that names the thing (file, key, split, class, counts); Ctrl-C at any moment
ends with status 130 and one line. In-process runs of the CLI on tiny data; one subprocess
(Ctrl-C while the command line is still importing torch)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from data_factories import write_image_folder, write_mini_imagenet_cache
from sklearn.datasets import load_digits

from l2l_adversarial.app import files, report, runs, training
from l2l_adversarial.app.cli import main
from l2l_adversarial.data.digits import Digits

TINY = ["-o", "dataset.name=digits", "-o", "dataset.image_size=16", "-o", "device=cpu",
        "-o", "model.hidden=4", "-o", "task.ways=3", "-o", "task.query_shots=2",
        "-o", "train.iterations=2", "-o", "train.meta_batch_size=1", "-o", "train.adaptation_steps=1",
        "-o", "train.validate_every=null", "-o", "evaluate.tasks=2", "-o", "evaluate.adaptation_steps=1",
        "-o", "evaluate.eps=[2]", "--quiet"]  # fmt: skip


def one_error_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI; assert status 2 and exactly one stderr line ``error: ...``; return it."""
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert re.fullmatch(r"error: .+; .+", lines[0]), lines[0]  # what, where; how to fix
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained and evaluated run folder (copied by the tests that change it)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--run-dir", str(run), *TINY]) == 0
    assert main(["evaluate", str(run), *TINY]) == 0
    return run


# -- tasks the data cannot fill: the split, the class and the counts -------------------------
def digit_counts() -> dict[int, int]:
    """Images per digit, counted from scikit-learn's own copy (the reference)."""
    return dict(enumerate(np.bincount(load_digits().target).tolist()))


def test_a_class_too_small_for_shots_and_query_shots_is_named_with_the_counts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = one_error_line(["train", "--run-dir", str(tmp_path / "r"), *TINY,
                           "-o", "task.shots=3", "-o", "task.query_shots=200"], capsys)  # fmt: skip
    found = re.search(r"3 \+ 200 = 203 samples of a class, but class '?(\d)'? of the digits "
                      r"train split has (\d+) \((\d) more classes too\)", line)  # fmt: skip
    assert found, line
    digit, count, more = map(int, found.groups())
    counts = {d: n for d, n in digit_counts().items() if d in Digits.CLASSES["train"]}
    assert count == counts[digit] == min(counts.values())  # the smallest class is named
    assert more == sum(n < 203 for n in counts.values()) - 1
    assert "task.shots or task.query_shots" in line
    assert not (tmp_path / "r").exists()  # refused before the run folder was made


def test_more_ways_than_the_split_has_classes_names_the_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = one_error_line(["train", "--run-dir", str(tmp_path / "r"), *TINY,
                           "-o", "task.ways=6"], capsys)  # fmt: skip
    classes = len(Digits.CLASSES["train"])
    assert f"ways=6 classes, but the digits train split has {classes};" in line
    assert "lower ways (task.ways)" in line


def test_a_cache_with_two_images_per_class_names_the_class_the_split_and_the_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    cache = write_mini_imagenet_cache(data, "train", num_classes=5, images_per_class=2,
                                      image_size=16)  # fmt: skip
    line = one_error_line(["train", "--run-dir", str(tmp_path / "r"), *TINY, "-o",
                           "dataset.name=mini-imagenet", "-o", f"dataset.root={data}", "-o",
                           "dataset.strict=false", "-o", "dataset.image_size=null"], capsys)  # fmt: skip
    first = min(cache.class_dict)  # every class has 2 images: the first by name is named
    assert {len(rows) for rows in cache.class_dict.values()} == {2}
    assert (
        f"1 + 2 = 3 samples of a class, but class '{first}' of the mini-imagenet train split "
        f"in '{data}' has 2 (4 more classes too)"
    ) in line


# -- folders called folders -------------------------------------------------------------------
def test_a_folder_where_a_data_file_belongs_is_called_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data" / "mini-imagenet-cache-train.pkl").mkdir(parents=True)
    line = one_error_line(["train", "--run-dir", str(tmp_path / "r"), *TINY, "-o",
                           "dataset.name=mini-imagenet", "-o", "dataset.image_size=null",
                           "-o", f"dataset.root={tmp_path / 'data'}"], capsys)  # fmt: skip
    assert (
        f"'{tmp_path / 'data' / 'mini-imagenet-cache-train.pkl'}' is a folder, not a file;" in line
    )
    images = write_image_folder(tmp_path / "images", classes=4, per_class=3, size=8)
    (tmp_path / "split.json").mkdir()
    line = one_error_line(["train", "--run-dir", str(tmp_path / "r"), *TINY, "-o",
                           "dataset.name=image-folder", "-o", f"dataset.root={images}",
                           "-o", f"dataset.split_file={tmp_path / 'split.json'}"], capsys)  # fmt: skip
    assert f"'{tmp_path / 'split.json'}' is a folder, not a file;" in line


def test_a_folder_given_as_a_results_file_or_the_config_is_called_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = one_error_line(["report", str(tmp_path), "--output", str(tmp_path / "r")], capsys)
    assert line == f"error: is a folder, not a file, '{tmp_path}'; give a file"
    line = one_error_line(["train", str(tmp_path), *TINY], capsys)
    assert line.startswith(f"error: config '{tmp_path}' is a folder, not a file; ")


# -- -o mistakes are blamed on the -o --------------------------------------------------------
def test_a_typo_in_an_override_is_blamed_on_that_override_not_the_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("method: maml\ntrain: {meta_lr: 0.01}\n")
    line = one_error_line(["train", str(config), *TINY, "-o", "trian.iterations=3"], capsys)
    assert line == (
        "error: invalid configuration (1 problem): trian: unknown field "
        "[set by -o trian.iterations=3]; fix this key"
    )
    line = one_error_line(["train", str(config), *TINY, "-o", "train.meta_lr=-1",
                           "-o", "seed=x"], capsys)  # fmt: skip
    assert "train.meta_lr: min value is 1e-12" in line and "[set by -o train.meta_lr=-1]" in line
    assert "seed: must be of integer type" in line and "[set by -o seed=x]" in line
    assert "(2 problems)" in line and line.endswith("; fix these keys")
    config.write_text("trian: {iterations: 3}\n")  # the file's own typo: blamed on the file
    line = one_error_line(["train", str(config), *TINY], capsys)
    assert f"trian: unknown field [in '{config}']" in line


def test_usage_mistakes_are_one_line_too(capsys: pytest.CaptureFixture[str]) -> None:
    for argv, named in ((["train", "--seeds", "x"], "--seeds: invalid int value: 'x'"),
                        (["evaluate", "run", "--checkpoint", "worst"], "--checkpoint"),
                        (["report"], "results"), (["trian"], "'trian'")):  # fmt: skip
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
        assert lines[0].endswith("--help")


# -- report inputs ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("where", "field", "value", "expected"),
    [("scenario", "accuracy", "abc", "a number"), ("scenario", "accuracy", None, "a number"),
     ("scenario", "task_accuracies", [1, "x"], "list[float]"), ("result", "shots", "1", "an integer"),
     ("result", "method", 3, "a string"), ("result", "shots", True, "an integer")],
)  # fmt: skip
def test_a_results_file_with_a_value_of_the_wrong_type_names_the_field_and_the_file(
    trained: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    where: str,
    field: str,
    value: object,
    expected: str,
) -> None:
    results = json.loads((trained / "evaluation.json").read_text())
    (results[0]["scenarios"][1] if where == "scenario" else results[0])[field] = value
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    line = one_error_line(["report", str(path), "--output", str(tmp_path / "r")], capsys)
    name = f"scenarios[1].{field}" if where == "scenario" else field
    assert f"({name} is {value!r}, not {expected})" in line and f"'{path}'" in line
    assert not (tmp_path / "r").exists()


# -- a full disk -----------------------------------------------------------------------------
def full_disk(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_while_the_metrics_are_written_names_the_file_and_leaves_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    real_open = Path.open

    def open_on_a_full_disk(self: Path, mode: str = "r", *args: object, **kwargs: object):
        file = real_open(self, mode, *args, **kwargs)
        if self.name == "metrics.csv" and mode == "a":
            monkeypatch.setattr(file, "write", lambda text: full_disk())
        return file

    monkeypatch.setattr(Path, "open", open_on_a_full_disk)
    line = one_error_line(["train", "--run-dir", str(run), *TINY, "-o", "train.log_every=1"],
                          capsys)  # fmt: skip
    assert line == (
        f"error: no space left on device, '{run / 'metrics.csv'}'; free space there and "
        "run again, with --resume if it saved a checkpoint (that is kept)"
    )
    assert not (run / "metrics.csv").exists()  # no empty log left behind


def test_a_full_disk_keeps_an_existing_log_without_a_partial_row(tmp_path: Path) -> None:
    log = tmp_path / "metrics.csv"
    files.append_csv_row(log, ["iteration", "loss"], {"iteration": 1, "loss": 0.5})
    before = log.read_bytes()
    real_open = Path.open

    def half_written(self: Path, *args: object, **kwargs: object):
        file = real_open(self, *args, **kwargs)
        write = file.write

        def write_then_fail(text: str) -> int:
            write(text[: len(text) // 2])
            file.flush()
            full_disk()
            return 0

        file.write = write_then_fail
        return file

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "open", half_written)
        with pytest.raises(OSError) as raised:
            files.append_csv_row(log, ["iteration", "loss"], {"iteration": 2, "loss": 0.25})
    assert raised.value.filename == str(log) and raised.value.errno == errno.ENOSPC
    assert log.read_bytes() == before


def test_each_commands_advice_on_a_full_disk_fits_that_command(
    trained: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    monkeypatch.setattr(os, "fsync", full_disk)
    line = one_error_line(["evaluate", str(run), "--overwrite", "--quiet"], capsys)
    assert line == (
        f"error: no space left on device, '{run / 'evaluation.json'}'; free space there and "
        "run again, with --overwrite if it wrote results (those are kept)"
    )
    assert "--resume" not in one_error_line(
        ["report", str(run / "evaluation.json"), "--output", str(tmp_path / "r")], capsys
    )
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.stat().st_size == 0]


# -- Ctrl-C at any moment --------------------------------------------------------------------
def interrupting(call: Callable[..., Any]) -> Callable[..., Any]:
    """``call`` after a Ctrl-C (SIGINT): most commands stop at once, training defers it to
    the end of the meta-iteration."""

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)
        return call(*args, **kwargs)

    return interrupted


@pytest.mark.parametrize(
    ("command", "target", "name"),
    [("evaluate", runs, "evaluate"), ("report", report, "write_report"),
     ("train", training.Trainer, "step")],
)  # fmt: skip
def test_ctrl_c_in_each_command_ends_with_one_line_and_status_130(
    trained: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
    target: object,
    name: str,
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    argv = {
        "evaluate": ["evaluate", str(run), "--overwrite", "--quiet"],
        "report": ["report", str(run / "evaluation.json"), "--output", str(tmp_path / "r")],
        "train": ["train", "--run-dir", str(tmp_path / "new"), *TINY],
    }[command]
    monkeypatch.setattr(target, name, interrupting(getattr(target, name)))
    capsys.readouterr()
    assert main(argv) == 130
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted (SIGINT) "), lines


def test_ctrl_c_while_the_command_line_starts_ends_with_one_line_and_status_130() -> None:
    """A real SIGINT, sent while ``l2l-adversarial`` imports torch (seconds of its start-up)."""
    child = (
        "import builtins, os, runpy, signal, sys\n"
        "real = builtins.__import__\n"
        "def importing(name, *args, **kwargs):\n"
        "    if name == 'torch':\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = importing\n"
        "sys.argv = ['l2l-adversarial', 'configs']\n"
        "runpy.run_module('l2l_adversarial', run_name='__main__', alter_sys=True)\n"
    )
    root = Path(__file__).parents[1]
    result = subprocess.run(
        [sys.executable, "-c", child],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
        timeout=300,
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr == (
        "interrupted (SIGINT) while starting; nothing was written, run it again\n"
    )


def test_a_full_disk_while_decoding_a_dataset_names_the_cache_and_leaves_no_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Blocks are reserved before the memory map is written (a full disk would kill the
    process with SIGBUS there): the reservation's ENOSPC ends as the error line."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    write_mini_imagenet_cache(data, "train", num_classes=5, images_per_class=4, image_size=16)
    monkeypatch.setattr(os, "posix_fallocate", full_disk, raising=False)
    line = one_error_line(["train", "--run-dir", str(tmp_path / "r"), *TINY, "-o",
                           "dataset.name=mini-imagenet", "-o", f"dataset.root={data}", "-o",
                           "dataset.strict=false", "-o", "dataset.image_size=null", "-o",
                           f"dataset.cache_dir={cache}"], capsys)  # fmt: skip
    images = cache / "mini-imagenet-train-learn2learn.images.npy"
    assert line.startswith(f"error: no space left on device, '{images}'; free space there")
    assert list(cache.iterdir()) == [] and not (tmp_path / "r").exists()
