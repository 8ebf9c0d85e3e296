"""Checkpoints that are written atomically and loaded without unpickling arbitrary objects.

A checkpoint is a ``dict`` of tensors, numbers, strings, lists and dicts saved with
``torch.save`` to a temporary file in the same folder, flushed to disk and renamed over the
old file (``os.replace``), so a crash never leaves a half-written file in place of a good
one. Loading uses ``torch.load(weights_only=True)``, which refuses any other object.

Example:
    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "last.pt"
    >>> save_checkpoint(path, {"iteration": 3, "model": {"w": torch.zeros(2)}}, kind="train")
    >>> load_checkpoint(path, kind="train")["iteration"]
    3
"""

from __future__ import annotations

import pickle
import random
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from l2l_adversarial.files import atomic_open

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]

FORMAT = "l2l-adversarial-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or from another run."""


def save_checkpoint(path: str | Path, state: Mapping[str, Any], kind: str) -> None:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    payload = {"format": FORMAT, "version": VERSION, "kind": kind, **state}
    with atomic_open(path) as file:
        torch.save(payload, file)


def load_checkpoint(
    path: str | Path, kind: str, expected: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; refuse anything else.

    ``expected`` maps keys of the checkpoint to the values this run needs (e.g. the method
    and model shape); any difference is reported and refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        EOFError,
        RuntimeError,
        ValueError,
    ) as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not an l2l-adversarial checkpoint "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "delete it or point --resume at another run"
        ) from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an l2l-adversarial checkpoint")
    if state.get("version") != VERSION or state.get("kind") != kind:
        raise CheckpointError(
            f"{str(path)!r} is a {state.get('kind')!r} checkpoint of format version "
            f"{state.get('version')}; expected a {kind!r} checkpoint of version {VERSION}"
        )
    mismatched = [
        f"{key}: checkpoint has {state.get(key)!r}, this run has {value!r}"
        for key, value in (expected or {}).items()
        if state.get(key) != value
    ]
    if mismatched:
        raise CheckpointError(
            f"checkpoint {str(path)!r} belongs to a different run:\n  " + "\n  ".join(mismatched)
        )
    return state


def rng_state() -> dict[str, Any]:
    """Every random state a run draws from: Python, NumPy, torch CPU and CUDA."""
    numpy_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    return {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
