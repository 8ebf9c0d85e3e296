"""Checkpoints that are written atomically, prove their content, and are loaded without
unpickling arbitrary objects.

A checkpoint is a ``dict`` of tensors, numbers, strings, lists and dicts saved with
``torch.save`` to a temporary file in the same folder, flushed to disk and renamed over the
old file (``os.replace``), so a crash never leaves a half-written file in place of a good
one. It carries a SHA-256 digest of its whole content (:func:`content_digest`), checked on
load, so a damaged file is refused instead of loading altered numbers. Loading uses
``torch.load(weights_only=True)``, which refuses any other object.

Example:
    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "last.pt"
    >>> digest = save_checkpoint(path, {"iteration": 3, "model": {"w": torch.zeros(2)}}, kind="train")
    >>> load_checkpoint(path, kind="train")["digest"] == digest
    True
    >>> load_checkpoint(path, kind="train")["iteration"]
    3
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from l2l_adversarial.app.files import atomic_open
from l2l_adversarial.errors import UserError

__all__ = [
    "CheckpointError",
    "check_finite_weights",
    "content_digest",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "seed_all",
    "set_rng_state",
]

FORMAT = "l2l-adversarial-checkpoint"
VERSION = 2  # 2: a content digest


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or from another run."""


def content_digest(state: Any) -> str:
    """SHA-256 of a checkpoint's content: keys, numbers, strings and every tensor's dtype,
    shape and bytes, in order.

    >>> content_digest({"w": torch.zeros(2)}) == content_digest({"w": torch.zeros(2)})
    True
    >>> content_digest({"w": torch.zeros(2)}) == content_digest({"w": torch.ones(2)})
    False
    """
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{list(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, Mapping):
            digest.update(f"D{len(value)}".encode())
            for key, item in value.items():
                feed(key)
                feed(item)
        elif isinstance(value, list | tuple):
            digest.update(f"L{len(value)}".encode())
            for item in value:
                feed(item)
        else:
            digest.update(f"S{type(value).__name__}:{value!r};".encode())

    feed(state)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, state: Mapping[str, Any], kind: str) -> str:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename); return its
    content digest."""
    payload = {"format": FORMAT, "version": VERSION, "kind": kind, **state}
    payload["digest"] = content_digest(payload)
    buffer = io.BytesIO()  # serialised first: a full disk fails in write() with ENOSPC
    torch.save(payload, buffer)
    with atomic_open(path) as file:
        file.write(buffer.getbuffer())
    return str(payload["digest"])


def load_checkpoint(
    path: str | Path, kind: str, expected: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; refuse anything else.

    ``expected`` maps keys of the checkpoint to the values this run needs (e.g. the method
    and model shape); any difference is reported and refused.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint, {str(path)!r} is missing or not a file; train the run first"
        )
    data = path.read_bytes()
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # any failure to parse the file means it is not a checkpoint
        first = str(error).splitlines()[0] if str(error) else ""
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or not an l2l-adversarial checkpoint "
            f"({type(error).__name__}: {first[:200]}); delete it, or restore it from a copy"
        ) from error
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not an l2l-adversarial checkpoint; point at a run folder's "
            "checkpoint.pt"
        )
    if state.get("version") != VERSION or state.get("kind") != kind:
        raise CheckpointError(
            f"{str(path)!r} is a {state.get('kind')!r} checkpoint of format version "
            f"{state.get('version')}, expected a {kind!r} checkpoint of version {VERSION}; "
            "train the run again with this version"
        )
    saved = state.pop("digest", None)
    if saved != content_digest(state):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is damaged: its content does not match its digest; "
            "restore it from a copy, or train again"
        )
    state["digest"] = saved
    mismatched = [
        f"{key}: checkpoint has {saved!r}, this run has {value!r}"
        for key, saved, value in _differences(state, expected or {})
    ]
    if mismatched:
        raise CheckpointError(
            f"checkpoint {str(path)!r} belongs to a different run ({'; '.join(mismatched)}); "
            "use that run's folder or train again"
        )
    return state


def _differences(
    saved: Mapping[str, Any], expected: Mapping[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    """``(dotted key, saved value, expected value)`` of every key of ``expected`` that
    ``saved`` holds otherwise, descending into dictionaries (a parameter's shape, not all).

    >>> _differences({"task": {"ways": 5, "shots": 1}}, {"task": {"ways": 4, "shots": 1}})
    [('task.ways', 5, 4)]
    """
    found = []
    for key, value in expected.items():
        old = saved.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            found += _differences(old, value, f"{prefix}{key}.")
        elif old != value:
            found.append((f"{prefix}{key}", old, value))
    return found


def check_finite_weights(path: str | Path, weights: Mapping[str, torch.Tensor]) -> None:
    """Refuse a checkpoint whose floating-point weights hold NaN or inf."""
    broken = [
        name
        for name, value in weights.items()
        if value.is_floating_point() and not bool(value.isfinite().all())
    ]
    if broken:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds non-finite weights ({', '.join(broken[:3])}); "
            "train the run again with a lower train.meta_lr"
        )


def rng_state() -> dict[str, Any]:
    """Every random state a run draws from: Python, NumPy, torch CPU and CUDA."""
    numpy_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))
    return {
        "python": random.getstate(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def seed_all(seed: int) -> None:
    """Seed every generator :func:`rng_state` captures (Python, NumPy, torch CPU and CUDA):
    a run's checkpoints, digests included, are then the same in every process that runs it.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
