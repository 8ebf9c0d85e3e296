"""l2l-adversarial: adversarial meta-learning (ADML, MAML-AD, Adversarial Querying) and
L-infinity attacks as drop-in pieces for learn2learn training loops."""

from l2l_adversarial.algorithms import (
    ADML,
    MAML,
    MAMLAD,
    RMAML,
    AdversarialQuerying,
    MatchingNetwork,
)
from l2l_adversarial.attacks import FFGSM, FGSM, PGD, Attack
from l2l_adversarial.errors import UserError
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
