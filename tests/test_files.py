"""atomic_open: all or nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from l2l_adversarial.app.files import atomic_open


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
