"""Several processes (GPUs, machines) with ``torch.distributed``, as launched by ``torchrun``.

:func:`init_from_environment` joins the process group that ``torchrun`` describes in the
environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
without ``torchrun`` (``WORLD_SIZE`` unset or 1) it does nothing and everything runs in one
process. The helpers below are no-ops in one process, so the same code runs both ways:
:func:`rank_indices` splits work (task ``i`` goes to rank ``i % world_size``),
:func:`gather_strided` puts the per-rank results back in global order on every rank,
:func:`mean_over_ranks` and :func:`average_gradients` average scalars and gradients, and
:func:`on_rank0` runs file writes on rank 0 while an error there is raised on every rank.

Example:
    >>> rank, world_size, device = init_from_environment()   # (0, 1, None) without torchrun
    >>> list(rank_indices(5))
    [0, 1, 2, 3, 4]
    >>> gather_strided([x * x for x in rank_indices(3)], 3)
    [0, 1, 4]
    >>> shutdown()
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "average_gradients",
    "cuda_device",
    "gather_strided",
    "init_from_environment",
    "is_distributed",
    "mean_over_ranks",
    "on_rank0",
    "rank_indices",
    "shutdown",
    "world",
]

T = TypeVar("T")
REQUIRED_ENVIRONMENT = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without a process group."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _environment_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={value!r} must be an integer; launch with torchrun, "
            "which sets it"
        ) from None


def init_from_environment(
    timeout: timedelta | None = None,
) -> tuple[int, int, torch.device | None]:
    """Join the process group described by ``torchrun``'s environment variables.

    With ``WORLD_SIZE`` > 1, initialises the default process group (backend ``gloo`` on CPU;
    with CUDA, ``nccl`` for CUDA tensors and ``gloo`` for CPU tensors) and, with CUDA, makes
    ``cuda:LOCAL_RANK`` this process's device. Returns ``(rank, world_size, device)``, the
    device being ``None`` without CUDA. Without ``torchrun`` returns ``(0, 1, None)`` and
    initialises nothing; called again, returns the group already joined.

    Args:
        timeout: how long a collective waits for the other ranks before failing
            (``torch.distributed``'s default: 30 minutes for gloo, 10 for nccl).
    """
    if "WORLD_SIZE" not in os.environ or _environment_int("WORLD_SIZE") <= 1:
        return 0, 1, None
    device = cuda_device() if torch.cuda.is_available() else None
    if is_distributed():
        return dist.get_rank(), dist.get_world_size(), device
    missing = [name for name in REQUIRED_ENVIRONMENT if name not in os.environ]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: launch "
            "with torchrun (e.g. torchrun --nproc_per_node=2 -m l2l_adversarial train ...)"
        )
    backend = "gloo"
    if device is not None:
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={device.index} but this machine has {torch.cuda.device_count()} "
                "GPUs: --nproc_per_node must not exceed the number of GPUs"
            )
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    options = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, **options)  # type: ignore[arg-type]
    return dist.get_rank(), dist.get_world_size(), device


def shutdown() -> None:
    """Leave the process group joined by :func:`init_from_environment` (if any)."""
    if is_distributed():
        dist.destroy_process_group()


def cuda_device() -> torch.device:
    """This process's GPU: ``cuda:LOCAL_RANK`` under ``torchrun``, else the current device."""
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return torch.device("cuda", _environment_int("LOCAL_RANK"))
    return torch.device("cuda", torch.cuda.current_device())


def rank_indices(count: int) -> range:
    """The indices ``0 <= i < count`` this rank handles: ``rank, rank + world_size, ...``."""
    rank, world_size = world()
    return range(rank, count, world_size)


def gather_strided(local: Sequence[T], count: int) -> list[T]:
    """All ``count`` items in global order, on every rank, from each rank's ``local`` items
    for :func:`rank_indices` (picklable objects; ``local`` itself in one process)."""
    rank, world_size = world()
    if len(local) != len(range(rank, count, world_size)):
        raise ValueError(
            f"rank {rank} holds {len(local)} items but rank_indices({count}) gives it "
            f"{len(range(rank, count, world_size))}: pass one item per index of this rank"
        )
    if world_size == 1:
        return list(local)
    gathered: list[Sequence[T] | None] = [None] * world_size
    dist.all_gather_object(gathered, list(local))
    return [gathered[i % world_size][i // world_size] for i in range(count)]  # type: ignore[index]


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_over_ranks(values: Sequence[float]) -> list[float]:
    """The mean of each value over all ranks (``values`` unchanged in one process)."""
    _, world_size = world()
    if world_size == 1:
        return [float(v) for v in values]
    summed = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(summed)
    return (summed / world_size).tolist()


def average_gradients(parameters: Iterable[torch.Tensor]) -> None:
    """Replace every ``.grad`` by its mean over the ranks (one all-reduce of a flat buffer).

    A parameter without a gradient on this rank counts as a zero gradient.
    """
    _, world_size = world()
    parameters = list(parameters)
    if world_size == 1 or not parameters:
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    grads = [parameter.grad for parameter in parameters if parameter.grad is not None]
    flat = torch.cat([grad.reshape(-1) for grad in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def on_rank0(action: Callable[[], object]) -> None:
    """Run ``action`` (e.g. writing files) on rank 0 only, then let every rank continue.

    If it raises on rank 0, every rank raises the same error instead of waiting forever for
    rank 0 at the next collective.
    """
    rank, world_size = world()
    error: BaseException | None = None
    if rank == 0:
        try:
            action()
        except Exception as raised:
            error = raised
    if world_size > 1:
        shared = [error]
        if rank == 0 and error is not None:
            try:
                pickle.dumps(error)
            except Exception:
                shared = [RuntimeError(f"rank 0 failed: {type(error).__name__}: {error}")]
        dist.broadcast_object_list(shared, src=0)
        if rank != 0:
            error = shared[0]
    if error is not None:
        raise error
