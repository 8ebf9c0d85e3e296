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
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from cerberus import Validator

from l2l_adversarial.algorithms import RMAML, AdversarialQuerying
from l2l_adversarial.algorithms.base import ATTACK_SETS, ATTACK_TARGETS
from l2l_adversarial.data.registry import DATASET_INFO
from l2l_adversarial.data.registry import DATASETS as _DATA_DATASETS
from l2l_adversarial.errors import UserError

__all__ = [
    "DATASETS",
    "ADVERSARIAL_METHODS",
    "METHODS",
    "PROTOCOL_PRESETS",
    "SCHEMA",
    "TWO_OPTIMIZER_METHODS",
    "ConfigError",
    "config_changes",
    "describe_changes",
    "dump_config",
    "load_config",
    "read_config_file",
    "validate_config",
]

METHODS = ("maml", "maml-ad", "adml", "aq", "r-maml", "matching-nets")
ADVERSARIAL_METHODS = ("maml-ad", "adml", "aq", "r-maml")
"""Methods that attack in meta-training: they take the attack and robustness-term keys."""
PLACEMENT_SETS = {"aq": AdversarialQuerying.placement_sets, "r-maml": RMAML.placement_sets}
"""The ``train.attack_sets`` of the methods that do not take all of them."""
DATASETS = _DATA_DATASETS  # the data package's registry: one list of names
# ship inside an installed package: no root needed
BUNDLED_DATASETS = tuple(name for name, info in DATASET_INFO.items() if info.bundled)
# dataset keys that only some datasets take (DATASET_INFO says which), with their defaults
_DATASET_OPTIONS = {
    "format": "auto",
    "cache_dir": None,
    "image_size": None,
    "channels": None,
    "rotations": False,
    "split_file": None,
    "split_ratio": None,
    "split_seed": 0,
}
TWO_OPTIMIZER_METHODS = ("adml",)
"""Methods with two meta-updates, ``train.meta_update: sequential`` (ADML's Algorithm 1,
line 11: beta1, then beta2); the others have one meta-objective and one optimizer."""


PROTOCOL_PRESETS: dict[str, dict[str, Any]] = {
    "literature": {
        "attack": "pgd",
        "pgd_steps": 20,
        "pgd_step_size": 2.0,
        "eps": [8.0],
        "tasks": 1000,
        "curves": False,
    }
}
"""``evaluate.protocol`` values that set other ``evaluate`` keys: ``literature`` is the robust
few-shot literature's evaluation (Goldblum et al. 2020 and later work): the query attacked with
PGD-20 at 8/255, step 2/255, against the adapted model after clean fine-tuning (the last step
only), on 1000 seeded test tasks, in the clean-support scenarios
(:data:`~l2l_adversarial.app.factory.LITERATURE_SCENARIOS`). A key set next to the preset (in
the same YAML file, or by ``-o``) wins over it, ``evaluate.attack: autoattack`` included; a
config file's value under a preset given by ``-o`` is replaced (a run's config.yaml holds the
settings of its paper evaluation)."""


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used, with every problem listed."""


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""``1e-3``: a number to a user, a string to YAML 1.1 (which wants ``1.0e-3``)."""


def _finite_float(value: Any) -> Any:
    """Coerce to float (``1e-3`` included); refuse booleans and NaN or infinite values
    (cerberus reports why)."""
    if isinstance(value, bool):
        raise TypeError(f"{value} is a boolean, not a number")
    if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, int | float):
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"{value} is not a finite number")
        return number
    return value  # the type rule reports it


def _not_boolean(value: Any) -> Any:
    if isinstance(value, bool):
        raise TypeError(f"{value} is a boolean, not an integer")
    return value


def _number(**rules: Any) -> dict[str, Any]:
    return {"type": "number", "coerce": _finite_float, **rules}


def _integer(**rules: Any) -> dict[str, Any]:
    return {"type": "integer", "coerce": _not_boolean, **rules}


def _section(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "dict", "default": {}, "schema": schema}


SCHEMA: dict[str, Any] = {
    "method": {"type": "string", "allowed": list(METHODS), "default": "adml"},
    "seed": _integer(min=0, default=0),
    # several training seeds: train runs one run folder per seed (run_dir/seed-<seed>)
    "seeds": {
        "type": "list",
        "minlength": 1,
        "schema": _integer(min=0),
        "nullable": True,
        "default": None,
    },
    "device": {"type": "string", "regex": r"auto|cpu|cuda(:\d+)?", "default": "auto"},
    "run_dir": {"type": "string", "nullable": True, "default": None},
    "dataset": _section(
        {
            "name": {"type": "string", "allowed": list(DATASETS), "default": "mini-imagenet"},
            "root": {"type": "string", "nullable": True, "default": None},
            "download": {"type": "boolean", "default": False},
            # false accepts caches of non-standard size (e.g. resized images, fewer classes)
            "strict": {"type": "boolean", "default": True},
            # which on-disk format to read (docs/data-formats.md); auto: the one found in root
            "format": {"type": "string", "default": "auto"},
            # the decoded uint8 cache's folder; null: root/.l2l-adversarial-cache (or ~/.cache)
            "cache_dir": {"type": "string", "nullable": True, "default": None},
            # digits, omniglot, image-folder: side of the (resized) images; digits' quickstart 16
            "image_size": _integer(min=8, nullable=True, default=None),
            # image-folder: 3 (RGB, default) or 1 (grey)
            "channels": _integer(allowed=[1, 3], nullable=True, default=None),
            # omniglot: the training classes rotated by 90, 180, 270 degrees as extra classes
            "rotations": {"type": "boolean", "default": False},
            # image-folder: class split from a JSON/YAML file, else a seeded ratio of classes
            "split_file": {"type": "string", "nullable": True, "default": None},
            "split_ratio": {
                "type": "list",
                "items": [_number(min=0, max=1)] * 3,
                "nullable": True,
                "default": None,
            },
            "split_seed": _integer(min=0, default=0),
            # the split kept on the training device as stored (uint8), tasks gathered there
            "device_resident": {"type": "boolean", "default": False},
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
            # the attack's placement (l2l_adversarial.algorithms.base.PlacementOptions): which
            # sets meta-training attacks and against which parameters; null: as the method's
            # paper does (adml, maml-ad: both, initial; aq, r-maml: query, adapted)
            "attack_sets": {
                "type": "string",
                "allowed": list(ATTACK_SETS),
                "nullable": True,
                "default": None,
            },
            "attack_target": {
                "type": "string",
                "allowed": list(ATTACK_TARGETS),
                "nullable": True,
                "default": None,
            },
            # PGD's step in pixel levels; null: 2.5 * eps / pgd_steps
            "pgd_step_size": _number(min=0, max=255, nullable=True, default=None),
            "adversarial_fraction": _number(min=0, max=1, default=1.0),
            # how adversarial query rows are scored (l2l_adversarial.algorithms.robust): the
            # task loss (ce) or TRADES's CE(clean) + trades_beta * KL(clean || adversarial)
            "robust_loss": {"type": "string", "allowed": ["ce", "trades"], "default": "ce"},
            "trades_beta": _number(min=0, default=6.0),
            # r-maml's lambda; null: 0.2 with robust_loss ce, trades_beta with trades
            "robust_weight": _number(min=0, nullable=True, default=None),
            # query-set passes in channels-last memory format; null: on when the device is the
            # CPU, where it measured faster (benchmarks/); same results either way
            "channels_last": {"type": "boolean", "nullable": True, "default": None},
            # divergence guard: a meta-loss above this stops the run before it can write a
            # checkpoint (null: off); chance-level cross-entropy is ln(ways), about 1.6
            "max_loss": _number(min=1e-12, nullable=True, default=1000.0),
            "checkpoint_every": _integer(min=1, default=500),
            "log_every": _integer(min=1, default=10),
            # meta-validation: clean and adversarial accuracy on seeded validation tasks every
            # validate_every iterations (validation.csv, best.pt); null: never
            "validate_every": _integer(min=1, nullable=True, default=500),
            "validation_tasks": _integer(min=1, default=50),
            "tensorboard": {"type": "boolean", "default": False},
            # meta-batches built ahead of the loop (l2l_adversarial.data.prefetch): worker
            # processes and meta-batches ahead; null: the default for the task source
            "workers": _integer(min=0, nullable=True, default=None),
            "prefetch": _integer(min=0, nullable=True, default=None),
            # on CUDA: deterministic algorithms, cuDNN without autotuning, a fixed cuBLAS
            # workspace, for an exact resume (l2l_adversarial.app.reproducibility)
            "deterministic": {"type": "boolean", "default": True},
            # how a meta-iteration runs (l2l_adversarial.engines): auto = sequential until a
            # GPU measurement says otherwise; vmap (experimental) batches the tasks (gradient
            # methods only)
            "engine": {
                "type": "string",
                "allowed": ["auto", "sequential", "vmap"],
                "default": "auto",
            },
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
            # paper: attacks against theta; adapted: the query against the scored model;
            # literature: the preset PROTOCOL_PRESETS["literature"] (adapted, PGD-20 at 8/255)
            "protocol": {
                "type": "string",
                "allowed": ["paper", "adapted", "literature"],
                "default": "paper",
            },
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
            # how test tasks run (l2l_adversarial.evaluation): auto = sequential; vmap (experimental)
            # adapts and scores chunk_size tasks at once (gradient methods only)
            "engine": {
                "type": "string",
                "allowed": ["auto", "sequential", "vmap"],
                "default": "auto",
            },
            # tasks checked, read back (and, with vmap, stacked) at once; bounds memory
            "chunk_size": _integer(min=1, default=20),
            # score (and attack) the model after every adaptation step; false: the last only
            "curves": {"type": "boolean", "default": True},
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


def _flatten_errors(errors: Mapping[str, Any], prefix: list[str]) -> list[tuple[str, str]]:
    messages: list[tuple[str, str]] = []
    for key, problems in errors.items():
        path = [*prefix, str(key)]
        for problem in problems:
            if isinstance(problem, Mapping):
                messages += _flatten_errors(problem, path)
            else:
                hint = "" if problem == "unknown field" else _rule_hint(path)
                messages.append((".".join(path), f"{problem}{hint}"))
    return messages


def validate_config(
    raw: Mapping[str, Any], sources: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Fill defaults and validate; raise :class:`ConfigError` listing every problem.

    ``sources`` maps a dotted key to where its value came from (e.g. the ``-o`` override);
    the problems with those keys name it.
    """
    validator = Validator(SCHEMA, purge_unknown=False)
    if not validator.validate(copy.deepcopy(dict(raw))):
        problems = _flatten_errors(validator.errors, [])
        for index, (key, problem) in enumerate(problems):
            source = _source_of(key, sources or {})
            problems[index] = (key, f"{problem} [{source}]" if source else problem)
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        listed = "; ".join(f"{key}: {problem}" for key, problem in problems)
        fix = "these keys" if len(problems) > 1 else "this key"
        raise ConfigError(f"invalid configuration ({count}): {listed}; fix {fix}")
    config: dict[str, Any] = validator.document
    _apply_protocol_preset(config, raw, sources or {})
    _check_dataset_root(config["dataset"])
    if config["train"]["meta_update"] == "sequential":
        _check_sequential_update(config["method"])
    if config["evaluate"]["attack"] == "autoattack" and config["task"]["ways"] < 4:
        raise ConfigError(
            f"evaluate.attack: autoattack needs task.ways >= 4 (its APGD-T targets three other "
            f"classes), not {config['task']['ways']}; use evaluate.attack=pgd for 2- and 3-way "
            "tasks"
        )
    _check_method_keys(config["method"], config["train"])
    for section in ("train", "evaluate"):
        if config["method"] == "matching-nets" and config[section]["engine"] == "vmap":
            raise ConfigError(
                f"{section}.engine: 'vmap' applies to gradient-based methods, not "
                "matching-nets; use auto or sequential"
            )
    return config


def _apply_protocol_preset(
    config: dict[str, Any], raw: Mapping[str, Any], sources: Mapping[str, str]
) -> None:
    """Set the keys of ``evaluate.protocol``'s preset (:data:`PROTOCOL_PRESETS`) that were not
    set next to it: by ``-o`` where ``-o`` gave the preset, in ``raw`` otherwise.

    >>> config = load_config(None, ["dataset.name=digits", "evaluate.protocol=literature",
    ...                             "evaluate.tasks=50"])
    >>> {key: config["evaluate"][key] for key in ("attack", "pgd_steps", "eps", "tasks")}
    {'attack': 'pgd', 'pgd_steps': 20, 'eps': [8.0], 'tasks': 50}
    """
    settings = config["evaluate"]
    preset = PROTOCOL_PRESETS.get(settings["protocol"], {})
    if "evaluate.protocol" in sources:  # the preset by -o: only -o's values win over it
        given = {key for key in preset if f"evaluate.{key}" in sources}
    else:  # the preset in a file (or -o evaluate={...}): the values beside it win
        section = raw.get("evaluate")
        given = set(section) if isinstance(section, Mapping) else set()
    for key, value in preset.items():
        if key not in given:
            settings[key] = copy.deepcopy(value)


def _check_sequential_update(method: str) -> None:
    if method not in TWO_OPTIMIZER_METHODS:
        raise ConfigError(
            "train.meta_update: 'sequential' applies to method adml only; it is ADML's "
            "two-optimizer update (Algorithm 1, line 11: a beta1 step on the adversarially "
            "adapted branch, then a beta2 step on the clean one), which "
            f"{method} does not have; set train.meta_update=joint or method=adml"
        )


def _check_method_keys(method: str, train: Mapping[str, Any]) -> None:
    """Refuse training keys that the method would ignore."""
    for key in ("attack_sets", "attack_target"):
        if train[key] is not None and method not in ADVERSARIAL_METHODS:
            raise ConfigError(
                f"train.{key} places the attack of meta-training, which {method} does not "
                f"make; remove it or use one of {', '.join(ADVERSARIAL_METHODS)}"
            )
    accepted = PLACEMENT_SETS.get(method, ATTACK_SETS)
    if train["attack_sets"] is not None and train["attack_sets"] not in accepted:
        raise ConfigError(
            f"train.attack_sets: {train['attack_sets']!r} means nothing for {method}, whose "
            f"adversarial rows are its queries; use one of {', '.join(accepted)}"
        )
    if train["robust_weight"] is not None and method != "r-maml":
        raise ConfigError(
            f"train.robust_weight applies to method r-maml only (its lambda), not {method}; "
            "remove it, or set train.trades_beta for the TRADES weight of the other methods"
        )
    if train["robust_loss"] != "ce" and method not in ADVERSARIAL_METHODS:
        raise ConfigError(
            f"train.robust_loss: {train['robust_loss']!r} scores adversarial rows, which "
            f"{method} does not make; use one of {', '.join(ADVERSARIAL_METHODS)} or "
            "train.robust_loss=ce"
        )


def _source_of(key: str, sources: Mapping[str, str]) -> str:
    """The override (or file) that set ``key`` or the section holding it, else the overrides
    that set keys inside it (``-o trian.iterations=3`` made the unknown section ``trian``).

    >>> _source_of("trian", {"": "in 'c.yaml'", "trian.iterations": "set by -o trian.iterations=3"})
    'set by -o trian.iterations=3'
    """
    parts = key.split(".")
    for length in range(len(parts), 0, -1):
        source = sources.get(".".join(parts[:length]))
        if source:
            return source
    inside = [source for name, source in sources.items() if name.startswith(f"{key}.")]
    return ", ".join(inside) or sources.get("", "")


def _check_dataset_root(dataset: Mapping[str, Any]) -> None:
    name = dataset["name"]
    info = DATASET_INFO[name]
    for key, default in _DATASET_OPTIONS.items():
        if dataset[key] != default and key not in info.options:
            takers = [n for n, i in DATASET_INFO.items() if key in i.options]
            raise ConfigError(
                f"dataset.{key} applies to {', '.join(takers)} only, not {name!r}; remove it "
                "(docs/data-formats.md lists each dataset's keys)"
            )
    if dataset["format"] != "auto" and dataset["format"] not in info.formats:
        accepted = ", ".join(["auto", *info.formats])
        raise ConfigError(
            f"dataset.format {dataset['format']!r} is not a format of {name!r} (accepted: "
            f"{accepted}); docs/data-formats.md describes each"
        )
    if name in BUNDLED_DATASETS:
        return
    if dataset["download"] and not info.downloadable:
        raise ConfigError(
            f"dataset.download: {name!r} cannot be downloaded; put its files in dataset.root "
            "(docs/data-formats.md says where each comes from)"
        )
    root = dataset["root"]
    if root is None:
        raise ConfigError(
            f"dataset.root is required for dataset {name!r}: set it to the folder "
            "holding the data files (or dataset.download=true to fetch them when online)"
        )
    if not Path(root).expanduser().is_dir() and not dataset["download"]:
        raise ConfigError(
            f"dataset.root {root!r} does not exist or is not a folder: point it at the data "
            "folder, or set dataset.download=true to fetch the data when online"
        )


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.meta_lr=0.002"`` -> ``(["train", "meta_lr"], 0.002)`` (value parsed as YAML).

    An empty value is refused (write ``null`` for none), as is a value that is not YAML.
    """
    key, separator, value = text.partition("=")
    keys = key.strip().split(".")
    if not separator or not all(part.strip() for part in keys):
        raise ConfigError(
            f"override {text!r} is not key.subkey=value, on the command line; "
            "write e.g. -o train.iterations=100"
        )
    if not value.strip():
        raise ConfigError(
            f"override {text!r} has no value, on the command line; write {key.strip()}=VALUE "
            "(or =null for none)"
        )
    try:
        return [part.strip() for part in keys], _parse_yaml(value)
    except yaml.YAMLError as error:
        problem = " ".join(str(error).split())
        raise ConfigError(
            f"override {text!r}: the value is not valid YAML ({problem}), on the command "
            "line; quote strings and close brackets, e.g. evaluate.eps=[2,8]"
        ) from error


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file; refuse directories, non-UTF-8 text and duplicate
    keys, naming the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"config {str(path)!r} is a folder, not a file; give a YAML file (the examples "
            "are listed by `l2l-adversarial configs`)"
        )
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} not found; give an existing YAML file, or the name "
            "of a bundled config (`l2l-adversarial configs` lists them)"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte {error.start}); "
            "save it as UTF-8 YAML"
        ) from error
    try:
        loaded = _parse_yaml(text)
    except yaml.YAMLError as error:
        problem = " ".join(str(error).split())
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML ({problem}); fix the line named"
        ) from error
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of keys, got "
            f"{type(loaded).__name__}; write key: value lines"
        )
    return loaded


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Read a YAML config (or start from the defaults), apply ``key=value`` overrides, validate."""
    raw: dict[str, Any] = {} if path is None else read_config_file(path)
    sources = {} if path is None else {"": f"in {str(path)!r}"}
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                section = ".".join(keys[: depth + 1])
                raise ConfigError(
                    f"override {text!r}: {section!r} is {child!r}, not a section "
                    f"({_source_of(section, sources) or 'a default'}); make it a mapping of "
                    "keys, or override the key itself"
                )
            node = child
        node[keys[-1]] = value
        sources[".".join(keys)] = f"set by -o {text}"
    return validate_config(raw, sources)


NEUTRAL_KEYS = (
    "run_dir",
    "device",
    "dataset.root",
    "dataset.download",
    "dataset.format",  # every format of a dataset gives the same images and tasks
    "dataset.cache_dir",
    "train.iterations",
    "train.log_every",
    "train.checkpoint_every",
    "train.max_loss",
    "train.tensorboard",
    "evaluate",
)
"""Keys (or sections) a run may change when resumed: they do not alter what was trained."""


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (old value, new value)}`` for every key that changes what a run
    trains (:data:`NEUTRAL_KEYS` aside).

    >>> old = load_config(None, ["dataset.name=digits"])
    >>> new = load_config(None, ["dataset.name=digits", "seed=3", "train.iterations=9"])
    >>> config_changes(old, new)
    {'seed': (0, 3)}
    """
    before, after = _flatten(old), _flatten(new)
    neutral = tuple(f"{key}." for key in NEUTRAL_KEYS)
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(before.keys() | after.keys())
        if key not in NEUTRAL_KEYS
        and not key.startswith(neutral)
        and before.get(key) != after.get(key)
    }


def describe_changes(changes: Mapping[str, tuple[Any, Any]], now: str = "now") -> str:
    """:func:`config_changes` for a one-line error message.

    >>> describe_changes({"seed": (0, 3), "train.meta_lr": (0.001, 0.01)})
    'seed: checkpoint 0, now 3; train.meta_lr: checkpoint 0.001, now 0.01'
    """
    return "; ".join(f"{key}: checkpoint {a!r}, {now} {b!r}" for key, (a, b) in changes.items())


def dump_config(config: Mapping[str, Any]) -> str:
    """The resolved config as YAML (written into every run folder)."""
    return yaml.safe_dump(dict(config), sort_keys=False)
