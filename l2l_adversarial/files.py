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

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_open", "write_atomic"]


@contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """A binary file to write that replaces ``path`` only once the block succeeds.

    The data goes to a temporary file in the same folder (created if missing), is flushed to
    disk and renamed over ``path`` (``os.replace``); if the block raises, the temporary file is
    removed and ``path`` keeps its previous content.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
    )
    try:
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
