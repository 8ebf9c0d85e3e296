"""SIGTERM and SIGUSR1 (what schedulers such as SLURM send before killing a job) stop a
command like Ctrl-C does: as an :class:`Interrupted` exception, so training saves a
checkpoint and every command ends with one line.

Example:
    >>> import os, signal
    >>> try:
    ...     with interrupt_on_signals():
    ...         os.kill(os.getpid(), signal.SIGUSR1)
    ... except Interrupted as interrupt:
    ...     print(interrupt.name, interrupt.exit_code)
    SIGUSR1 138
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

__all__ = ["SIGNALS", "DeferredSignals", "Interrupted", "deferred_signals", "interrupt_on_signals"]

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Interrupted(KeyboardInterrupt):
    """A stop asked for by a signal (SIGINT, SIGTERM, SIGUSR1)."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """``128 + signal number``, what a shell reports for a process a signal stopped."""
        return 128 + int(self.signum)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum=signum)


@contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """Within the block, :data:`SIGNALS` raise :class:`Interrupted` (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class DeferredSignals:
    """The first signal received inside :func:`deferred_signals` (``None``: none yet)."""

    signum: int | None = None


@contextmanager
def deferred_signals() -> Iterator[DeferredSignals]:
    """Within the block, the first SIGINT, SIGTERM or SIGUSR1 is only noted (in the
    yielded object's ``signum``), so a loop can stop at a consistent point; a second one
    raises :class:`Interrupted` at once (main thread only; elsewhere nothing is deferred).

    >>> import os, signal
    >>> with deferred_signals() as stop:
    ...     os.kill(os.getpid(), signal.SIGTERM)
    ...     print("still running, stop asked by", signal.Signals(stop.signum).name)
    still running, stop asked by SIGTERM
    """
    state = DeferredSignals()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def note(signum: int, frame: FrameType | None) -> None:
        if state.signum is not None:
            raise Interrupted(signum=signum)
        state.signum = signum

    previous = {signum: signal.signal(signum, note) for signum in (signal.SIGINT, *SIGNALS)}
    try:
        yield state
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
