"""atomic_open: all or nothing; CSV logs cut back to a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from l2l_adversarial.app.files import append_csv_row, atomic_open, drop_csv_rows_after


def test_a_failed_block_keeps_the_previous_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_bytes(b"good")
    with pytest.raises(RuntimeError, match="interrupted"), atomic_open(path) as file:
        file.write(b"half")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"good"
    assert list(tmp_path.iterdir()) == [path]


def test_a_successful_block_replaces_the_file_and_creates_folders(tmp_path: Path) -> None:
    path = tmp_path / "new" / "folder" / "results.json"
    with atomic_open(path) as file:
        file.write(b"new")
    assert path.read_bytes() == b"new"
    assert list(path.parent.iterdir()) == [path]


def test_csv_rows_after_the_checkpoint_are_dropped_and_the_rest_kept_as_written(
    tmp_path: Path,
) -> None:
    log, fields = tmp_path / "metrics.csv", ("iteration", "loss")
    for iteration in (10, 20, 30):
        append_csv_row(log, fields, {"iteration": iteration, "loss": iteration / 7})
    appended = log.read_text()
    drop_csv_rows_after(log, fields, 30)  # nothing after 30: untouched
    assert log.read_text() == appended
    drop_csv_rows_after(log, fields, 25)
    assert log.read_text() == "".join(appended.splitlines(keepends=True)[:3])
    drop_csv_rows_after(tmp_path / "missing.csv", fields, 0)
    assert not (tmp_path / "missing.csv").exists()
