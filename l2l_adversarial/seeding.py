"""One seed derivation for every random stream of the package: tasks, attacks, evaluation.

Example:
    >>> derive_seed(0, 3) == derive_seed(0, 3) != derive_seed(0, 4)
    True
"""

from __future__ import annotations

import numpy as np

__all__ = ["checked_seed", "derive_seed"]


def derive_seed(*keys: int) -> int:
    """A 64-bit seed hashed from non-negative integer keys (numpy's ``SeedSequence``).

    Example:
        >>> derive_seed(7)
        16920295385781661272
    """
    for key in keys:
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or key < 0:
            raise ValueError(f"seed keys must be non-negative integers, got {keys!r}")
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)
    return int(state[0])


def checked_seed(seed: int | None) -> int | None:
    """``seed`` unchanged if it is None or a non-negative integer, else a ValueError.

    Example:
        >>> checked_seed(3), checked_seed(None)
        (3, None)
    """
    if seed is not None:
        derive_seed(seed)
    return seed
