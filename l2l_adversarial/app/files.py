"""Files written all or nothing: a crash never leaves a half-written file where a good one was.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "results.json"
    >>> with atomic_open(path) as file:
    ...     _ = file.write(b"[]")
    >>> path.read_bytes()
    b'[]'
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from l2l_adversarial.errors import naming

__all__ = [
    "append_csv_row",
    "atomic_open",
    "default_file_mode",
    "drop_csv_rows_after",
    "write_atomic",
]


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file here: ``0o666`` less the process umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file to write that replaces ``path`` only once the block succeeds.

    The data goes to a temporary file in the same folder (created if missing), is flushed to
    disk and renamed over ``path`` (``os.replace``); if the block raises, the temporary file is
    removed and ``path`` keeps its previous content. The file gets the umask's mode, like any
    other new file; an ``OSError`` while writing (a full disk) names ``path``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    try:
        with naming(target):
            os.fchmod(handle, default_file_mode())
            with os.fdopen(handle, "wb") as file:
                yield file
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through :func:`atomic_open`; returns the path."""
    with atomic_open(path) as file:
        file.write(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(path)


def append_csv_row(path: Path, fieldnames: Sequence[str], row: Mapping[str, Any]) -> None:
    """Append ``row`` to the CSV log at ``path``, writing the header first if it is new.

    All or nothing: if the write fails (a full disk), the log is left as it was (a new one not
    at all, an old one without a partial row) and the ``OSError`` names ``path``.
    """
    size = path.stat().st_size if path.exists() else None
    try:
        with naming(path), path.open("a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            if size is None:
                writer.writeheader()
            writer.writerow(row)
    except OSError:
        if size is None:
            path.unlink(missing_ok=True)
        else:
            os.truncate(path, size)
        raise


def drop_csv_rows_after(path: Path, fieldnames: Sequence[str], iteration: int) -> None:
    """Keep only the rows of the CSV log at ``path`` whose ``iteration`` is at most
    ``iteration`` (a resumed checkpoint's: the run logs the later ones again), rewriting it
    atomically if any is dropped; a missing log stays missing."""
    if not path.exists():
        return
    with path.open(newline="") as file:
        logged = list(csv.DictReader(file))
    rows = [row for row in logged if int(row["iteration"]) <= iteration]
    if len(rows) == len(logged):
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())
