"""The task runtime: runs per-task objectives for a meta-batch, task after task or stacked.

Training (:func:`meta_step`) and meta-testing (:func:`l2l_adversarial.evaluation.evaluate`)
both run here. The runtime owns what running tasks involves and the algorithms do not:
choosing the engine (:func:`resolve_engine`), chunks and halving them on out-of-memory,
attacking a stack of tasks in one call, each task's random-start stream
(:mod:`~l2l_adversarial.runtime.streams`) and the model's layout for a stack
(:mod:`~l2l_adversarial.runtime.layouts`: folded into channels or vmapped). Algorithms see
only the operations of :class:`~l2l_adversarial.algorithms.task_ops.TaskOps`.
"""

from l2l_adversarial.runtime import engine
from l2l_adversarial.runtime.engine import *  # noqa: F403
from l2l_adversarial.runtime.stacked_ops import StackedOps, attack_stacked
from l2l_adversarial.runtime.streams import GeneratorStates, SeededStarts

__all__ = [
    *engine.__all__,
    "GeneratorStates",
    "SeededStarts",
    "StackedOps",
    "attack_stacked",
]
