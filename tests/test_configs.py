"""Bundled configs: found by name (a path still works), listed, and unknown names refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from data_factories import write_mini_imagenet_cache

from l2l_adversarial.app.benchmark import BENCHMARK_DATASETS, BENCHMARK_METHODS, benchmark_config
from l2l_adversarial.app.cli import main
from l2l_adversarial.app.config import ConfigError, load_config
from l2l_adversarial.app.configs import CONFIG_FOLDER, bundled_configs, config_path

NAME = "mini-imagenet-5w1s-adml"


def test_every_bundled_name_resolves_to_its_file() -> None:
    names = bundled_configs()
    benchmark = len(BENCHMARK_DATASETS) * 2 * len(BENCHMARK_METHODS)  # x 1 and 5 shots
    assert len(names) == len(list(CONFIG_FOLDER.glob("*.yaml"))) == 33 + benchmark
    for name in names:
        path = config_path(name)
        assert path == CONFIG_FOLDER / f"{name}.yaml" and path.is_file()


def test_the_benchmark_configs_hold_each_methods_published_attack_placement(
    tmp_path: Path,
) -> None:
    keys = ("attack", "eps", "pgd_steps", "pgd_step_size", "attack_sets", "attack_target")
    placements = {  # method: the training attack (PGD's default 7 steps unused by FGSM)
        "maml": None, "maml-ad": ("fgsm", 2.0, 7, None, "both", "initial"),
        "adml": ("fgsm", 2.0, 7, None, "both", "initial"),
        "aq": ("pgd", 8.0, 7, 2.0, "query", "adapted"),
        "r-maml-ce": None, "r-maml-trades": None,  # trained as the r-maml configs (below)
    }  # fmt: skip
    assert set(placements) == set(BENCHMARK_METHODS)
    evaluation = load_config(config_path("mini-imagenet-5w1s-adml"), [f"dataset.root={tmp_path}"])
    for dataset in BENCHMARK_DATASETS:
        for shots in (1, 5):
            for method, attack in placements.items():
                path = config_path(benchmark_config(dataset, shots, method))
                config = load_config(path, [f"dataset.root={tmp_path}"])
                assert (config["method"], config["dataset"]["name"]) == (
                    method.removesuffix("-ce").removesuffix("-trades"), dataset)  # fmt: skip
                assert config["task"]["shots"] == shots and config["task"]["query_shots"] == 15
                assert config["evaluate"] == evaluation["evaluate"]  # the paper's evaluation
                if attack is not None:
                    assert tuple(config["train"][key] for key in keys) == attack
                if method.startswith("r-maml"):
                    own = f"{dataset}-5w{shots}s-{method.replace('-ce', '')}"
                    trained = load_config(config_path(own), [f"dataset.root={tmp_path}"])
                    assert config["train"] == trained["train"]


def test_descriptions_are_the_first_comment_lines() -> None:
    for name, description in bundled_configs().items():
        first = (CONFIG_FOLDER / f"{name}.yaml").read_text().splitlines()[0]
        assert first == f"# {description}" and len(description) > 10


def test_paths_are_returned_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        config_path(tmp_path / "mine.yaml") == tmp_path / "mine.yaml"
    )  # missing: load_config says so
    assert config_path("configs/other.yml") == Path("configs/other.yml")
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).write_text("method: maml\n")  # a local file wins over the bundled name
    assert config_path(NAME) == Path(NAME)
    assert load_config(config_path(NAME), ["dataset.name=digits"])["method"] == "maml"


def test_unknown_name_names_the_closest() -> None:
    with pytest.raises(ConfigError, match="closest: mini-imagenet-5w1s-adml") as error:
        config_path("mini-imagenet-5w1-adml")
    assert "l2l-adversarial configs" in str(error.value)
    with pytest.raises(ConfigError) as error:
        config_path("zzz")
    assert "closest" not in str(error.value) and "path of a YAML file" in str(error.value)


def test_train_by_name_uses_the_bundled_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for mode in ("train", "validation"):  # training validates on the validation split
        write_mini_imagenet_cache(
            tmp_path / "data", mode, num_classes=6, images_per_class=4, image_size=16
        )
    overrides = [f"dataset.root={tmp_path / 'data'}", "dataset.strict=false", "train.iterations=1",
                 "model.hidden=8", "task.query_shots=2", "train.adaptation_steps=1",
                 "train.meta_batch_size=1", "train.validate_every=null"]  # fmt: skip
    run = tmp_path / "run"
    flags = [flag for override in overrides for flag in ("-o", override)]
    assert main(["train", NAME, "--run-dir", str(run), "--quiet", *flags]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    bundled = load_config(CONFIG_FOLDER / f"{NAME}.yaml", overrides)
    assert saved["method"] == "adml" and saved["task"]["shots"] == 1
    assert saved["train"] == bundled["train"] and saved["evaluate"] == bundled["evaluate"]

    assert main(["train", "mini-imagenet-5w1s-amdl", "--run-dir", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no config file or bundled config named 'mini-imagenet-5w1s-amdl'")
    assert NAME in err and not (tmp_path / "no").exists()


def test_configs_command_lists_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {line.split()[0]: line.split(None, 1)[1] for line in lines[: len(bundled_configs())]}
    assert listed == bundled_configs()
    assert str(CONFIG_FOLDER) in lines[-1]
