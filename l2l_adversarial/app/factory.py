"""One factory from a validated config to the objects a run needs: the device, the learner and
its training attack, the evaluation attack, the task source, and the display names of methods
and datasets. ``train`` and ``evaluate`` build through it alike.

Example:
    >>> from l2l_adversarial.app.config import validate_config
    >>> config = validate_config({"method": "adml", "dataset": {"name": "digits"}})
    >>> type(build_learner(config, in_channels=1, image_size=16)).__name__
    'ADML'
    >>> evaluation_attack(config["evaluate"])(eps=2 / 255)
    FGSM(eps=0.00784314, data_range=(0.0, 1.0))
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from l2l_adversarial import algorithms
from l2l_adversarial.algorithms import MatchingNetwork
from l2l_adversarial.app.config import METHODS, ConfigError
from l2l_adversarial.attacks import FFGSM, FGSM, PGD, Attack, pixel_levels
from l2l_adversarial.autoattack import AutoAttack
from l2l_adversarial.data import DATASET_INFO, make_tasks
from l2l_adversarial.distributed import cuda_device
from l2l_adversarial.errors import DeviceError
from l2l_adversarial.evaluation import Scenario
from l2l_adversarial.models import CNN4

__all__ = [
    "DATASET_TITLES",
    "LITERATURE_SCENARIOS",
    "METHOD_NAMES",
    "build_attack",
    "build_learner",
    "evaluation_attack",
    "evaluation_options",
    "resolve_device",
    "task_source",
]

DATASET_TITLES = {name: info.title for name, info in DATASET_INFO.items()}
LITERATURE_SCENARIOS = (Scenario(0.0, 0.0), Scenario(0.0, 1.0))
"""``evaluate.protocol: literature``: clean fine-tuning; the query clean, and attacked."""
METHOD_NAMES = {
    "maml": "MAML",
    "maml-ad": "MAML-AD",
    "adml": "ADML",
    "aq": "AQ",
    "r-maml": "R-MAML",
    "matching-nets": "Matching Nets",
}


def resolve_device(name: str) -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; ``"cuda"`` without a GPU is an error.

    ``"auto"`` and ``"cuda"`` mean this process's GPU: ``cuda:LOCAL_RANK`` under torchrun.
    """
    if name == "auto":
        return cuda_device() if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device {name!r} is not available, CUDA is missing on this machine (config key "
            "device); use device=auto or device=cpu"
        )
    return cuda_device() if device.type == "cuda" and device.index is None else device


def build_attack(
    name: str,
    eps_255: float,
    pgd_steps: int,
    seed: int | None = None,
    pgd_step_size: float | None = None,
) -> Attack:
    """The attack named in a config, eps and PGD's step (default ``2.5 * eps / pgd_steps``)
    given in 8-bit pixel levels (``2`` -> 2/255).

    Its per-call value checks are off (``check_values=False``): the data was validated when
    loaded, and training's divergence guard stops a non-finite loss with the setting to
    change, where a diverged inner loop would make the attack raise instead.
    """
    eps = pixel_levels(eps_255)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    if name == "fgsm":
        return FGSM(eps=eps, check_values=False)
    if name == "ffgsm":
        return FFGSM(eps=eps, generator=generator, check_values=False)
    if name == "pgd":
        step = None if pgd_step_size is None else pixel_levels(pgd_step_size)
        return PGD(
            eps=eps, steps=pgd_steps, step_size=step, generator=generator, check_values=False
        )
    raise ValueError(f"attack must be one of 'fgsm', 'ffgsm', 'pgd'; got {name!r}")


LEARNERS: dict[str, type[algorithms.MetaLearner]] = {
    "maml": algorithms.MAML,
    "maml-ad": algorithms.MAMLAD,
    "adml": algorithms.ADML,
    "aq": algorithms.AdversarialQuerying,
    "r-maml": algorithms.RMAML,
}
"""The gradient-based methods' learner classes (``matching-nets`` is built apart)."""
LEARNER_KEYWORDS = {
    "clean_inner_lr": "clean_lr",
    "attack_sets": "attack_sets",
    "attack_target": "attack_target",
    "adversarial_fraction": "adversarial_fraction",
    "robust_weight": "robust_weight",
}
"""``train`` keys passed to the learners that take them, as the keyword they take."""


def build_learner(config: dict[str, Any], in_channels: int, image_size: int) -> nn.Module:
    """The configured meta-learner around the paper's 4-layer CNN (its embedding for
    Matching Networks), for ``in_channels`` x ``image_size`` x ``image_size`` images."""
    method, train, ways, hidden = (
        config["method"], config["train"], config["task"]["ways"], config["model"]["hidden"]
    )  # fmt: skip
    if image_size < CNN4.MIN_IMAGE_SIZE:
        raise ConfigError(
            f"the {config['dataset']['name']} images are {image_size} x {image_size} pixels, "
            f"too small for the 4-layer CNN (four 2x2 poolings need {CNN4.MIN_IMAGE_SIZE}); "
            f"set dataset.image_size to {CNN4.MIN_IMAGE_SIZE} or more"
        )
    if method == "matching-nets":
        return MatchingNetwork(
            ways=ways, in_channels=in_channels, image_size=image_size, hidden=hidden,
            fce=config["model"]["fce"],
        )  # fmt: skip
    model = CNN4(ways=ways, in_channels=in_channels, hidden=hidden, image_size=image_size)
    channels_last = train["channels_last"]
    if channels_last is None:  # on when training on the CPU ("cuda" must not need a GPU here)
        device = config["device"]
        channels_last = device == "cpu" or (
            device == "auto" and resolve_device(device).type == "cpu"
        )
    common = {
        "lr": train["inner_lr"],
        "first_order": train["first_order"],
        "adaptation_steps": train["adaptation_steps"],
        "channels_last": channels_last,
    }
    if method not in LEARNERS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    learner = LEARNERS[method]
    accepted = inspect.signature(learner).parameters
    if "attack" in accepted:
        common.update(
            attack=build_attack(train["attack"], train["eps"], train["pgd_steps"],
                                seed=config["seed"], pgd_step_size=train["pgd_step_size"]),
            robust_loss=train["robust_loss"],
            trades_beta=train["trades_beta"],
        )  # fmt: skip
    for key, keyword in LEARNER_KEYWORDS.items():  # None: the learner's own default
        if keyword in accepted and train[key] is not None:
            common[keyword] = train[key]
    return learner(model, **common)


def evaluation_attack(settings: dict[str, Any]) -> Callable[[float], Attack]:
    """``evaluate.attack`` as a function of the radius: FGSM, PGD (``pgd_steps``, step
    ``pgd_step_size`` pixel levels) or the AutoAttack ensemble."""
    if settings["attack"] == "pgd":
        step = settings["pgd_step_size"]
        return functools.partial(
            PGD, steps=settings["pgd_steps"], step_size=None if step is None else pixel_levels(step)
        )
    return AutoAttack if settings["attack"] == "autoattack" else FGSM


def evaluation_options(settings: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of :func:`~l2l_adversarial.evaluation.evaluate` that a config's
    ``evaluate`` section sets. ``protocol: literature`` (its preset already applied by the
    config, :data:`~l2l_adversarial.app.config.PROTOCOL_PRESETS`) is the library's
    ``"adapted"`` protocol in :data:`LITERATURE_SCENARIOS`; other protocols score the paper's
    scenarios.

    Example:
        >>> from l2l_adversarial.app.config import validate_config
        >>> config = validate_config({"dataset": {"name": "digits"},
        ...                           "evaluate": {"protocol": "literature"}})
        >>> options = evaluation_options(config["evaluate"])
        >>> options["protocol"], options["epsilons"], options["make_attack"](eps=8 / 255)
        ('adapted', [8.0], PGD(eps=0.0313725, steps=20, step_size=0.00784314, random_start=True))
    """
    literature = settings["protocol"] == "literature"
    return {
        "epsilons": settings["eps"],
        "make_attack": evaluation_attack(settings),
        "protocol": "adapted" if literature else settings["protocol"],
        "scenarios": LITERATURE_SCENARIOS if literature else None,
        "seed": settings["seed"],
        "engine": settings["engine"],
        "chunk_size": settings["chunk_size"],
        "curves": settings["curves"],
    }


def task_source(config: dict[str, Any], mode: str, seed: int, num_tasks: int = -1) -> Any:
    """The configured dataset's seeded tasks of split ``mode`` (``num_tasks=-1``: a stream)."""
    dataset, task = config["dataset"], config["task"]
    takes = DATASET_INFO[dataset["name"]].options
    options: dict[str, Any] = {
        key: dataset[key]
        for key in takes
        if dataset[key] is not None and (key != "rotations" or mode == "train")
    }
    return make_tasks(
        dataset["name"],
        dataset["root"],
        mode,
        task["ways"],
        task["shots"],
        task["query_shots"],
        seed=seed,
        num_tasks=num_tasks,
        download=dataset["download"],
        device=resolve_device(config["device"]) if dataset["device_resident"] else None,
        **options,
    )
