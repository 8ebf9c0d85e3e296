"""Adversarial meta-learners: drop-in replacements for ``learn2learn.algorithms.MAML``."""

from l2l_adversarial.algorithms.adml import ADML, ADMLObjective, AdversarialTask
from l2l_adversarial.algorithms.adversarial_querying import AdversarialQuerying
from l2l_adversarial.algorithms.base import AdversarialMetaLearner, MetaLearner
from l2l_adversarial.algorithms.maml import MAML
from l2l_adversarial.algorithms.maml_ad import MAMLAD
from l2l_adversarial.algorithms.matching_networks import MatchingNetwork

__all__ = [
    "ADML",
    "ADMLObjective",
    "AdversarialMetaLearner",
    "AdversarialQuerying",
    "AdversarialTask",
    "MAML",
    "MAMLAD",
    "MatchingNetwork",
    "MetaLearner",
]
