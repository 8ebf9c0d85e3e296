"""Run folders: one writer at a time (an advisory ``fcntl`` lock), and old results moved
aside, not deleted, until a new run has replaced them.

A run folder holds :data:`RESULT_FILES`; a folder holding a checkpoint, a summary or an
evaluation holds results, which only ``--resume`` continues and only ``--overwrite``
replaces. A folder with just a config and metrics (a run killed before its first checkpoint)
holds none and can be started again.

Example:
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with writer_lock(folder, "train"):
    ...     (folder / "config.yaml").write_text("seed: 0\\n")
    ...     aside = move_aside(folder)
    8
    >>> sorted(p.name for p in folder.iterdir()) == [".lock", aside.name]
    True
    >>> restore_aside(folder, aside)
    >>> sorted(p.name for p in folder.iterdir())
    ['.lock', 'config.yaml']
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from l2l_adversarial.app.files import default_file_mode
from l2l_adversarial.errors import UserError, naming

__all__ = [
    "RESULT_FILES",
    "RunFolderError",
    "has_results",
    "move_aside",
    "reader_lock",
    "remove_aside",
    "restore_aside",
    "writer_lock",
]

RESULT_FILES = ("checkpoint.pt", "metrics.csv", "config.yaml", "summary.json", "evaluation.json",
                "best.pt", "validation.csv", "evaluation_best.json", "tensorboard")  # fmt: skip
"""What a run writes into its folder (other files there are the user's and left alone)."""
LOCK = ".lock"
ASIDE_PREFIX = ".replaced-"


class RunFolderError(UserError, RuntimeError):
    """The run folder holds results that would be overwritten, or another process uses it."""


def has_results(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a trained (or evaluated) run, not just a killed start."""
    return any(
        (run_dir / name).exists() for name in ("checkpoint.pt", "summary.json", "evaluation.json")
    )


def _holder(lock_path: Path) -> str:
    try:
        words = lock_path.read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        words = []
    return (
        f"process {words[0]} ({' '.join(words[1:]) or 'l2l-adversarial'})"
        if words
        else "another process"
    )


def _lock_or_refuse(handle: int, operation: int, run_dir: Path, refusal: str) -> None:
    """Take the folder's lock (``fcntl.LOCK_EX`` or ``LOCK_SH``) without waiting, or raise
    :class:`RunFolderError` with ``refusal`` (its ``{holder}`` named)."""
    try:
        fcntl.flock(handle, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(run_dir / LOCK)
        raise RunFolderError(
            f"run folder {str(run_dir)!r} {refusal.format(holder=holder)}"
        ) from None


@contextmanager
def writer_lock(run_dir: Path, command: str) -> Iterator[None]:
    """Hold the folder's exclusive lock (creating the folder), or refuse naming the holder."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK
    handle = os.open(lock_path, os.O_RDWR | os.O_CREAT, default_file_mode())
    try:
        _lock_or_refuse(handle, fcntl.LOCK_EX, run_dir, "is in use by {holder}; wait for it "
                        "to finish, or choose another run folder")  # fmt: skip
        try:
            with naming(lock_path):
                os.ftruncate(handle, 0)
                os.write(handle, f"{os.getpid()} l2l-adversarial {command}\n".encode())
        except OSError:  # a full disk: no empty lock file left behind (this process holds it)
            lock_path.unlink()
            raise
        yield
    finally:
        os.close(handle)  # releases the lock


@contextmanager
def reader_lock(run_dir: Path) -> Iterator[None]:
    """Hold the folder's shared lock while reading it, or refuse while a writer holds it."""
    lock_path = run_dir / LOCK
    try:
        handle = os.open(lock_path, os.O_RDONLY)
    except FileNotFoundError:  # no writer ever ran here
        yield
        return
    try:
        _lock_or_refuse(handle, fcntl.LOCK_SH, run_dir, "is being written by {holder}; wait "
                        "for it to finish, then run the command again")  # fmt: skip
        yield
    finally:
        os.close(handle)


def move_aside(run_dir: Path) -> Path | None:
    """Move the run's :data:`RESULT_FILES` into a new hidden folder of ``run_dir``; return
    it (``None`` when there was nothing to move)."""
    present = [run_dir / name for name in RESULT_FILES if (run_dir / name).exists()]
    if not present:
        return None
    aside = run_dir / f"{ASIDE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    aside.mkdir()
    for path in present:
        path.rename(aside / path.name)
    return aside


def restore_aside(run_dir: Path, aside: Path) -> None:
    """Undo :func:`move_aside`: the new run's files are dropped, the old ones put back."""
    for name in RESULT_FILES:
        path = run_dir / name
        if path.is_dir():  # the TensorBoard folder
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for path in aside.iterdir():
        path.rename(run_dir / path.name)
    aside.rmdir()


def remove_aside(aside: Path) -> None:
    """Delete what :func:`move_aside` kept, once the new run has replaced it."""
    shutil.rmtree(aside)
