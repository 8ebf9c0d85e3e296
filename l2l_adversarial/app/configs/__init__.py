"""The paper's settings, shipped with the package: one YAML config per dataset x shots x method,
found by name (``l2l-adversarial configs`` lists them).

Example:
    >>> config_path("mini-imagenet-5w1s-adml").name
    'mini-imagenet-5w1s-adml.yaml'
    >>> bundled_configs()["cifar100-5w5s-maml"]
    'CIFAR100, 5-way 5-shot, MAML: paper Table 4.'
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from l2l_adversarial.app.config import ConfigError

__all__ = ["CONFIG_FOLDER", "bundled_configs", "config_path", "describe_bundled_configs"]

CONFIG_FOLDER = Path(__file__).parent
"""Where the bundled ``*.yaml`` files are installed."""


def bundled_configs() -> dict[str, str]:
    """Name -> description (the file's first comment line) of every bundled config, by name."""
    configs = {}
    for path in sorted(CONFIG_FOLDER.glob("*.yaml")):
        first = path.read_text(encoding="utf-8").partition("\n")[0]
        configs[path.stem] = first.removeprefix("#").strip() if first.startswith("#") else ""
    return configs


def describe_bundled_configs() -> str:
    """The ``configs`` command's listing: one line per bundled config, then where they are."""
    configs = bundled_configs()
    width = max(map(len, configs))
    lines = [f"{name:<{width}}  {description}" for name, description in configs.items()]
    return "\n".join(lines) + (
        f"\n\nfiles in {CONFIG_FOLDER}; train one by name: l2l-adversarial train NAME "
        "-o dataset.root=DIR"
    )


def config_path(name_or_path: str | os.PathLike[str]) -> Path:
    """The file of a bundled config named ``name_or_path``, or ``name_or_path`` as a path.

    An existing file, or anything that looks like a path (a folder separator or a ``.yaml`` /
    ``.yml`` suffix), is returned as given. Any other text must be a bundled config's name; an
    unknown name raises :class:`ConfigError` naming the closest bundled names.
    """
    path = Path(name_or_path)
    text = os.fspath(name_or_path)
    looks_like_path = os.sep in text or "/" in text or path.suffix in (".yaml", ".yml")
    if path.is_file() or looks_like_path:
        return path
    names = bundled_configs()
    if text in names:
        return CONFIG_FOLDER / f"{text}.yaml"
    close = difflib.get_close_matches(text, names, n=5, cutoff=0.6)
    hint = f"closest: {', '.join(close)}; " if close else ""
    raise ConfigError(
        f"no config file or bundled config named {text!r}; {hint}"
        "`l2l-adversarial configs` lists the bundled ones, or give the path of a YAML file"
    )
