"""l2l-adversarial: adversarial meta-learning (ADML, MAML-AD, Adversarial Querying) and
L-infinity attacks as drop-in pieces for learn2learn training loops.

The public classes (and the submodules) are imported on first use, so ``import
l2l_adversarial`` takes no time and the command line answers Ctrl-C at any moment of its
start-up with one line, not a traceback:

    >>> import l2l_adversarial
    >>> l2l_adversarial.FGSM.__module__, l2l_adversarial.engines.__name__
    ('l2l_adversarial.attacks', 'l2l_adversarial.engines')
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from l2l_adversarial.errors import UserError

if TYPE_CHECKING:
    from l2l_adversarial.algorithms import (
        ADML,
        MAML,
        MAMLAD,
        RMAML,
        AdversarialQuerying,
        MatchingNetwork,
    )
    from l2l_adversarial.attacks import FFGSM, FGSM, PGD, Attack
    from l2l_adversarial.models import CNN4, MLP
    from l2l_adversarial.task import Task

__version__ = "0.1.0"

__all__ = [
    "ADML",
    "CNN4",
    "FFGSM",
    "FGSM",
    "MAML",
    "MAMLAD",
    "MatchingNetwork",
    "MLP",
    "PGD",
    "RMAML",
    "Task",
    "AdversarialQuerying",
    "Attack",
    "UserError",
    "__version__",
]
_HOME = {"FFGSM": "attacks", "FGSM": "attacks", "PGD": "attacks", "Attack": "attacks",
         "CNN4": "models", "MLP": "models", "Task": "task"}  # fmt: skip
"""Where each public class lives (the others: :mod:`l2l_adversarial.algorithms`)."""


def __getattr__(name: str) -> Any:
    """A public class, or a submodule, imported at its first use (PEP 562)."""
    if name in __all__:
        home = _HOME.get(name, "algorithms")
        value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
