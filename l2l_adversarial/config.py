"""Run configuration: YAML files validated with cerberus, with command-line overrides.

Every key has a default (the paper's setting where the paper gives one), so a config file
only states what differs. Unknown keys, wrong types, out-of-range values and missing dataset
roots are rejected before any work starts, with the key and the accepted values named.

Epsilons are written in pixel levels of 8-bit images, like the paper: ``eps: 2`` means
2/255 on images scaled to [0, 1].

Example:
    >>> config = load_config(None, overrides=["method=adml", "dataset.name=digits"])
    >>> config["train"]["inner_lr"], config["train"]["eps"]
    (0.01, 2.0)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from cerberus import Validator

__all__ = [
    "DATASETS",
    "METHODS",
    "SCHEMA",
    "ConfigError",
    "dump_config",
    "load_config",
    "validate_config",
]

METHODS = ("maml", "maml-ad", "adml", "aq", "matching-nets")
DATASETS = ("mini-imagenet", "cifar100", "cifar-fs", "digits")
BUNDLED_DATASETS = ("digits",)  # ship inside an installed package: no root needed


class ConfigError(ValueError):
    """A configuration that cannot be used, with every problem listed."""


def _number(**rules: Any) -> dict[str, Any]:
    return {"type": "number", "coerce": float, **rules}


def _integer(**rules: Any) -> dict[str, Any]:
    return {"type": "integer", **rules}


def _section(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "dict", "default": {}, "schema": schema}


SCHEMA: dict[str, Any] = {
    "method": {"type": "string", "allowed": list(METHODS), "default": "adml"},
    "seed": _integer(min=0, default=0),
    "device": {"type": "string", "regex": r"auto|cpu|cuda(:\d+)?", "default": "auto"},
    "run_dir": {"type": "string", "nullable": True, "default": None},
    "dataset": _section(
        {
            "name": {"type": "string", "allowed": list(DATASETS), "default": "mini-imagenet"},
            "root": {"type": "string", "nullable": True, "default": None},
            "download": {"type": "boolean", "default": False},
            # false accepts caches of non-standard size (e.g. resized images, fewer classes)
            "strict": {"type": "boolean", "default": True},
            # digits only: side of the upsampled images (the quickstart uses 16)
            "image_size": {"type": "integer", "min": 16, "nullable": True, "default": None},
        }
    ),
    "task": _section(
        {
            "ways": _integer(min=2, default=5),
            "shots": _integer(min=1, default=1),
            "query_shots": _integer(min=1, default=15),
        }
    ),
    "model": _section(
        {
            "hidden": _integer(min=1, default=32),
            "fce": {"type": "boolean", "default": True},
        }
    ),
    "train": _section(
        {
            "iterations": _integer(min=1, default=60000),
            "meta_batch_size": _integer(min=1, default=4),
            "inner_lr": _number(min=1e-12, default=0.01),
            "clean_inner_lr": _number(min=1e-12, nullable=True, default=None),
            "meta_lr": _number(min=1e-12, default=0.001),
            "clean_meta_lr": _number(min=1e-12, nullable=True, default=None),
            "adaptation_steps": _integer(min=1, default=5),
            "first_order": {"type": "boolean", "default": False},
            "meta_update": {
                "type": "string",
                "allowed": ["joint", "sequential"],
                "default": "joint",
            },
            "attack": {"type": "string", "allowed": ["fgsm", "ffgsm", "pgd"], "default": "fgsm"},
            "eps": _number(min=0, max=255, default=2.0),
            "pgd_steps": _integer(min=1, default=7),
            "attack_target": {
                "type": "string",
                "allowed": ["initial", "adapted"],
                "nullable": True,
                "default": None,
            },
            "adversarial_fraction": _number(min=0, max=1, default=1.0),
            # query-set passes in channels-last memory format; null: on when the device is the
            # CPU, where it measured faster (benchmarks/); same results either way
            "channels_last": {"type": "boolean", "nullable": True, "default": None},
            "checkpoint_every": _integer(min=1, default=500),
            "log_every": _integer(min=1, default=10),
            # meta-validation: clean and adversarial accuracy on seeded validation tasks every
            # validate_every iterations (validation.csv, best.pt); null: never
            "validate_every": _integer(min=1, nullable=True, default=500),
            "validation_tasks": _integer(min=1, default=50),
            "tensorboard": {"type": "boolean", "default": False},
        }
    ),
    "evaluate": _section(
        {
            "tasks": _integer(min=1, default=600),
            "adaptation_steps": _integer(min=1, default=10),
            "inner_lr": _number(min=1e-12, default=0.01),
            "eps": {
                "type": "list",
                "minlength": 1,
                "schema": _number(min=0, max=255),
                "default": [2.0, 0.2],
            },
            "protocol": {"type": "string", "allowed": ["paper", "adapted"], "default": "paper"},
            # autoattack: torchattacks' standard AutoAttack (APGD-CE, APGD-T, FAB-T, Square)
            "attack": {
                "type": "string",
                "allowed": ["fgsm", "pgd", "autoattack"],
                "default": "fgsm",
            },
            "pgd_steps": _integer(min=1, default=10),
            # PGD step size in pixel levels; null: 2.5 * eps / pgd_steps
            "pgd_step_size": _number(min=0, max=255, nullable=True, default=None),
            "seed": _integer(min=0, default=2018),
        }
    ),
}


def _rule_hint(path: list[str]) -> str:
    rules: Mapping[str, Any] = {"schema": SCHEMA}
    for key in path:
        schema = rules.get("schema", {})
        if key not in schema:
            return ""
        rules = schema[key]
    if "allowed" in rules:
        return f" (accepted: {', '.join(map(str, rules['allowed']))})"
    bounds = [f"{name} {rules[name]}" for name in ("min", "max") if name in rules]
    kind = rules.get("type", "")
    return (
        f" (expected {kind}{', ' if bounds and kind else ''}{', '.join(bounds)})"
        if kind or bounds
        else ""
    )


def _flatten_errors(errors: Mapping[str, Any], prefix: list[str]) -> list[str]:
    messages = []
    for key, problems in errors.items():
        path = [*prefix, str(key)]
        for problem in problems:
            if isinstance(problem, Mapping):
                messages += _flatten_errors(problem, path)
            else:
                hint = "" if problem == "unknown field" else _rule_hint(path)
                messages.append(f"  {'.'.join(path)}: {problem}{hint}")
    return messages


def validate_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults and validate; raise :class:`ConfigError` listing every problem."""
    validator = Validator(SCHEMA, purge_unknown=False)
    if not validator.validate(copy.deepcopy(dict(raw))):
        problems = "\n".join(_flatten_errors(validator.errors, []))
        raise ConfigError(f"invalid configuration:\n{problems}")
    config: dict[str, Any] = validator.document
    _check_dataset_root(config["dataset"])
    if config["method"] == "matching-nets" and config["train"]["meta_update"] == "sequential":
        raise ConfigError("train.meta_update: 'sequential' applies to method adml only")
    return config


def _check_dataset_root(dataset: Mapping[str, Any]) -> None:
    if dataset["name"] in BUNDLED_DATASETS:
        return
    if dataset["image_size"] is not None:
        raise ConfigError(
            f"dataset.image_size applies to the bundled digits only, not {dataset['name']!r}; "
            "remove it (the paper's images are used at their stored size)"
        )
    root = dataset["root"]
    if root is None:
        raise ConfigError(
            f"dataset.root is required for dataset {dataset['name']!r}: set it to the folder "
            "holding the data files (or dataset.download=true to fetch them when online)"
        )
    if not Path(root).expanduser().is_dir() and not dataset["download"]:
        raise ConfigError(
            f"dataset.root {root!r} does not exist or is not a folder: point it at the data "
            "folder, or set dataset.download=true to fetch the data when online"
        )


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.meta_lr=0.002"`` -> ``(["train", "meta_lr"], 0.002)`` (value parsed as YAML)."""
    key, separator, value = text.partition("=")
    if not separator or not key.strip():
        raise ConfigError(
            f"override {text!r} must look like key.subkey=value, e.g. train.iterations=100"
        )
    return key.strip().split("."), yaml.safe_load(value)


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read a YAML config (or start from the defaults), apply ``key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {str(path)!r} not found; the examples are in examples/configs/"
            )
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from error
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {str(path)!r} must hold a mapping of keys, got {type(loaded).__name__}"
            )
        raw = loaded
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = value
    return validate_config(raw)


def dump_config(config: Mapping[str, Any]) -> str:
    """The resolved config as YAML (written into every run folder)."""
    return yaml.safe_dump(dict(config), sort_keys=False)
