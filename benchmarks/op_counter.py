"""Count ATen operator calls and host-device synchronisations of a piece of code.

Every ATen operator call costs a dispatch; those that compute (all but views: ``view``,
``permute``, ``expand``, ``detach``... change metadata only) are at least one kernel launch on
CUDA (:attr:`OpCounter.launches`). ``_local_scalar_dense``
(``.item()``, ``bool()``, ``int()``, ``.tolist()`` of a tensor), ``nonzero``, ``_unique2``,
``masked_select`` and boolean-mask indexing make the host wait for the device, and so does
``Tensor.tolist()``, which dispatches no operator on a CPU tensor (on CUDA: a copy to the host),
so it is counted where it is called (``"Tensor.tolist"``). Counted on the
CPU with a :class:`~torch.utils._python_dispatch.TorchDispatchMode`, the numbers do not
depend on image size or machine speed, so they are exact and comparable across machines.

Example:
    >>> import torch
    >>> with OpCounter() as counter:
    ...     x = torch.ones(3)
    ...     _ = (x * 2).sum().item()
    >>> counter.ops, counter.launches, counter.syncs
    (4, 4, 1)
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter", "SYNCING_OPS"]

SYNCING_OPS = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.nonzero",
        "aten._unique2",
        "aten.unique_dim",
        "aten.unique_consecutive",
        "aten.masked_select",
        "aten.is_nonzero",
    }
)
"""Operators whose output size or value the host must wait for."""
METADATA_OPS = frozenset({"aten._unsafe_view", "aten._reshape_alias"})
"""Operators without the alias annotation of a view that still only change metadata."""


def _name(func: Any) -> str:
    return f"aten.{func._schema.name.split('::')[-1]}"


def _is_mask_index(func: Any, args: tuple[Any, ...]) -> bool:
    if _name(func) not in {"aten.index", "aten.index_put", "aten.index_put_"}:
        return False
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or [])


class OpCounter(TorchDispatchMode):
    """ATen operator calls (:attr:`ops`), those that are not views (:attr:`launches`) and
    syncing calls (:attr:`syncs`) inside the block, the syncing operators by name
    (:attr:`sync_names`)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.launches = 0
        self.syncs = 0
        self.sync_names: Counter[str] = Counter()
        self._host_reads = _HostReads(self)

    def __enter__(self) -> OpCounter:
        self._host_reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self._host_reads.__exit__(*exc)

    def __torch_dispatch__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        self.ops += 1
        name = _name(func)
        if not (func.is_view or name in METADATA_OPS):
            self.launches += 1
        if name in SYNCING_OPS or _is_mask_index(func, args):
            self.syncs += 1
            self.sync_names[name] += 1
        return func(*args, **(kwargs or {}))


class _HostReads(TorchFunctionMode):
    """Counts ``Tensor.tolist()`` calls into an :class:`OpCounter`'s syncs."""

    def __init__(self, counter: OpCounter) -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(
        self,
        func: Any,
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func is torch.Tensor.tolist:
            self.counter.syncs += 1
            self.counter.sync_names["Tensor.tolist"] += 1
        return func(*args, **(kwargs or {}))
