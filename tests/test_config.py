"""Configuration: defaults, overrides, and rejection of bad configs before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from l2l_adversarial.app.config import METHODS, TWO_OPTIMIZER_METHODS, ConfigError, load_config
from l2l_adversarial.app.configs import CONFIG_FOLDER
from l2l_adversarial.app.factory import build_learner

BUNDLED = sorted(CONFIG_FOLDER.glob("*.yaml"))


def test_defaults_are_the_papers_settings() -> None:
    config = load_config(None, ["dataset.name=digits"])
    train, evaluate, task = config["train"], config["evaluate"], config["task"]
    assert (train["inner_lr"], train["meta_lr"], train["adaptation_steps"]) == (0.01, 0.001, 5)
    assert (evaluate["adaptation_steps"], evaluate["tasks"], evaluate["eps"]) == (
        10,
        600,
        [2.0, 0.2],
    )
    assert (task["ways"], task["query_shots"], train["eps"], config["method"]) == (
        5,
        15,
        2.0,
        "adml",
    )


def test_file_values_and_command_line_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "method: maml\ndataset: {name: digits}\ntrain: {iterations: 7, meta_lr: 0.002}\n"
    )
    config = load_config(path, ["train.meta_lr=0.005", "evaluate.eps=[2, 8]"])
    assert config["method"] == "maml" and config["train"]["iterations"] == 7
    assert config["train"]["meta_lr"] == 0.005 and config["evaluate"]["eps"] == [2.0, 8.0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.itterations=5"], r"train\.itterations: unknown field"),
        (
            ["method=reptile"],
            r"method: unallowed value reptile \(accepted: maml, maml-ad, adml, aq, r-maml, matching-nets\)",
        ),
        (["train.meta_lr=-1"], r"train\.meta_lr: min value is 1e-12"),
        (["train.iterations=many"], r"train\.iterations: must be of integer type"),
        (["task.ways=1"], r"task\.ways: min value is 2"),
        (["evaluate.eps=[300]"], r"evaluate\.eps\.0: max value is 255"),
        (["train.meta_update=alternating"], r"accepted: joint, sequential"),
        (["evaluate.engine=fast"], r"evaluate\.engine: unallowed value fast \(accepted: auto"),
        (["evaluate.chunk_size=0"], r"evaluate\.chunk_size: min value is 1"),
        (["method=matching-nets", "train.engine=vmap"], r"train\.engine: 'vmap' applies to"),
        (["method=matching-nets", "evaluate.engine=vmap"], r"evaluate\.engine: 'vmap' applies"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["dataset.name=digits", *overrides])


@pytest.mark.parametrize("method", ["maml", "maml-ad", "aq", "matching-nets"])
def test_sequential_meta_update_is_refused_where_it_means_nothing(method: str) -> None:
    """ADML's two-optimizer update (Algorithm 1, line 11) only: the others were trained with
    one optimizer while the config said sequential."""
    with pytest.raises(ConfigError) as refused:
        load_config(
            None, ["dataset.name=digits", f"method={method}", "train.meta_update=sequential"]
        )
    message = str(refused.value)
    assert message.startswith("train.meta_update: 'sequential' applies to method adml only; ")
    assert "Algorithm 1, line 11" in message and f"which {method} does not have" in message
    assert message.endswith("set train.meta_update=joint or method=adml")
    config = load_config(
        None, ["dataset.name=digits", "method=adml", "train.meta_update=sequential"]
    )
    assert config["train"]["meta_update"] == "sequential"


@pytest.mark.parametrize("method", METHODS)
def test_the_methods_allowed_a_sequential_update_are_those_with_a_two_step_update(
    method: str,
) -> None:
    """The config's list agrees with what the built learners declare (the runtime's
    ``two_step_update``), so neither can drift from the other."""
    learner = build_learner(load_config(None, ["dataset.name=digits", f"method={method}"]), 1, 16)
    declared = getattr(learner, "two_step_update", None) is not None
    assert declared == (method in TWO_OPTIMIZER_METHODS)


def test_missing_dataset_root_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dataset.root is required for dataset 'mini-imagenet'"):
        load_config(None, [])
    with pytest.raises(ConfigError, match=r"does not exist.*download=true"):
        load_config(None, [f"dataset.root={tmp_path / 'nowhere'}"])
    assert load_config(None, [f"dataset.root={tmp_path}"])["dataset"]["root"] == str(tmp_path)


def test_unreadable_config_files_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key.subkey=value"):
        load_config(None, ["iterations"])


@pytest.mark.parametrize("path", BUNDLED, ids=[p.stem for p in BUNDLED])
def test_bundled_configs_are_valid(path: Path, tmp_path: Path) -> None:
    config = load_config(path, [f"dataset.root={tmp_path}"])
    assert config["train"]["inner_lr"] == 0.01 and config["evaluate"]["adaptation_steps"] == 10


def test_there_are_bundled_configs_for_every_paper_setting() -> None:
    names = {p.stem for p in BUNDLED}
    for dataset in ("mini-imagenet", "cifar100"):
        for shots in (1, 5):
            for method in ("maml", "maml-ad", "adml"):
                assert f"{dataset}-5w{shots}s-{method}" in names
