"""Adversarial meta-learners: drop-in replacements for ``learn2learn.algorithms.MAML``."""

from l2l_adversarial.algorithms.adml import ADML, ADMLObjective
from l2l_adversarial.algorithms.adversarial_querying import AdversarialQuerying
from l2l_adversarial.algorithms.base import (
    AdversarialMetaLearner,
    AdversarialOptions,
    LearnerOptions,
    MetaLearner,
)
from l2l_adversarial.algorithms.maml import MAML
from l2l_adversarial.algorithms.maml_ad import MAMLAD
from l2l_adversarial.algorithms.matching_networks import MatchingNetwork
from l2l_adversarial.algorithms.r_maml import RMAML, RMAMLObjective
from l2l_adversarial.algorithms.robust import RobustLoss, RobustOptions
from l2l_adversarial.algorithms.task_ops import SequentialOps, TaskObjective, TaskOps

__all__ = [
    "ADML",
    "ADMLObjective",
    "AdversarialMetaLearner",
    "AdversarialOptions",
    "AdversarialQuerying",
    "LearnerOptions",
    "MAML",
    "MAMLAD",
    "MatchingNetwork",
    "MetaLearner",
    "RMAML",
    "RMAMLObjective",
    "RobustLoss",
    "RobustOptions",
    "SequentialOps",
    "TaskObjective",
    "TaskOps",
]
