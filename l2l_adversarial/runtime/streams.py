"""Where each task's random attack starts come from, whatever the engine.

A task's attacks draw from a stream of its own, so running tasks one after another or stacked
gives the same samples:

* in meta-training, :class:`GeneratorStates`: the attack generator's state as each task left
  the task iterator (an iterator that seeds the generator before yielding a task gets the
  same samples from every engine); a task's attacks continue its own stream;
* in meta-testing, :class:`SeededStarts`: a fresh generator for every (task, set, step), seeded
  from ``derive_seed(task_seed, *stream)``, so every method sees the same random starts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from l2l_adversarial.seeding import derive_seed

__all__ = ["GeneratorStates", "SeededStarts"]


class GeneratorStates:
    """Per-task states of one generator (``None``: the attack draws nothing): each task's
    attacks draw from, and advance, the state the task was captured with."""

    def __init__(self, generator: torch.Generator | None) -> None:
        self.source = generator
        self.states: list[Tensor] = []

    def capture(self) -> None:
        """Record the generator's state for the next task."""
        if self.source is not None:
            self.states.append(self.source.get_state())

    def snapshot(self) -> list[Tensor]:
        return list(self.states)

    def restore(self, states: list[Tensor]) -> None:
        self.states = list(states)

    @contextmanager
    def generator(self, task: int, stream: tuple[int, ...]) -> Iterator[torch.Generator | None]:
        """The generator at task ``task``'s state (saved again on exit); ``stream`` is not
        needed: a task's attacks run in a fixed order."""
        if self.source is None:
            yield None
            return
        self.source.set_state(self.states[task])
        try:
            yield self.source
        finally:
            self.states[task] = self.source.get_state()


class SeededStarts:
    """A generator seeded from ``derive_seed(task_seeds[task], *stream)`` for every draw."""

    def __init__(self, task_seeds: Sequence[int]) -> None:
        self.task_seeds = list(task_seeds)

    @contextmanager
    def generator(self, task: int, stream: tuple[int, ...]) -> Iterator[torch.Generator]:
        yield torch.Generator().manual_seed(derive_seed(self.task_seeds[task], *stream))
