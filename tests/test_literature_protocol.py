"""``evaluate.protocol: literature``: what the preset resolves to, which values win over it, that
every method is scored on the same episodes, and that the query is attacked against the adapted
parameters (a hand-written float64 SGD + PGD-20 reference)."""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from data_factories import write_mini_imagenet_cache
from torch import nn

from l2l_adversarial.app import runs
from l2l_adversarial.app.config import load_config
from l2l_adversarial.app.factory import evaluation_options
from l2l_adversarial.app.report import load_results
from l2l_adversarial.app.runs import evaluate_run, train_runs
from l2l_adversarial.attacks import PGD
from l2l_adversarial.evaluation import GradientLearner, evaluate
from l2l_adversarial.seeding import derive_seed
from l2l_adversarial.task import Task
from l2l_adversarial.transforms import QUERY_STREAM

ROOT = Path(__file__).resolve().parents[1]

DIGITS = ["dataset.name=digits", "dataset.image_size=16"]
PRESET = dict(attack="pgd", pgd_steps=20, pgd_step_size=2.0, eps=[8.0], tasks=1000, curves=False)


def _governed(config: dict) -> dict:
    return {key: config["evaluate"][key] for key in PRESET}


def test_the_preset_resolves_to_the_literature_settings() -> None:
    config = load_config(None, [*DIGITS, "evaluate.protocol=literature"])
    assert _governed(config) == PRESET and config["evaluate"]["protocol"] == "literature"
    options = evaluation_options(config["evaluate"])
    attack = options["make_attack"](8 / 255)
    assert (type(attack).__name__, attack.steps, attack.random_start) == ("PGD", 20, True)
    assert attack.eps == pytest.approx(8 / 255) and attack.step_size == pytest.approx(2 / 255)
    assert options["protocol"] == "adapted" and options["epsilons"] == [8.0]
    assert [s.name for s in options["scenarios"]] == ["Clean-Clean", "Clean-Adversarial"]
    # the paper's protocol stays the default, with its own settings
    paper = load_config(None, DIGITS)["evaluate"]
    assert (paper["protocol"], paper["attack"], paper["eps"], paper["tasks"]) == (
        "paper", "fgsm", [2.0, 0.2], 600
    )  # fmt: skip
    assert evaluation_options(paper)["scenarios"] is None  # the paper's scenarios


def test_values_set_beside_the_preset_win_and_a_files_values_under_it_are_replaced(
    tmp_path: Path,
) -> None:
    explicit = load_config(None, [*DIGITS, "evaluate.protocol=literature",
                                  "evaluate.attack=autoattack", "evaluate.tasks=50"])  # fmt: skip
    assert _governed(explicit) == {**PRESET, "attack": "autoattack", "tasks": 50}
    # a run's config.yaml holds its paper evaluation's settings: -o's preset replaces them
    run_config = tmp_path / "config.yaml"
    run_config.write_text(yaml.safe_dump(load_config(None, DIGITS)))
    assert _governed(load_config(run_config, ["evaluate.protocol=literature"])) == PRESET
    # a file that sets the preset keeps what it sets beside it
    literature_file = tmp_path / "literature.yaml"
    literature_file.write_text(yaml.safe_dump({"dataset": {"name": "digits"}, "evaluate": {
        "protocol": "literature", "eps": [4], "tasks": 10}}))  # fmt: skip
    assert _governed(load_config(literature_file)) == {**PRESET, "eps": [4.0], "tasks": 10}


def test_two_methods_under_the_preset_are_scored_on_the_same_episodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, list[Task]] = {}
    original = runs.evaluate

    def recording(learner, tasks, **options):  # noqa: ANN001, ANN003, ANN202
        seen[options["method"]] = [tasks[index] for index in range(len(tasks))]
        return original(learner, tasks, **options)

    monkeypatch.setattr(runs, "evaluate", recording)
    tiny = [*DIGITS, "model.hidden=4", "task.query_shots=2", "train.iterations=1",
            "train.adaptation_steps=1", "train.validate_every=null", "evaluate.adaptation_steps=1",
            "evaluate.protocol=literature", "evaluate.tasks=3", "evaluate.pgd_steps=2"]  # fmt: skip
    results = []
    for method in ("maml", "adml"):
        overrides = [*tiny, f"method={method}"]
        (folder,) = train_runs(None, overrides, run_dir=str(tmp_path / method), progress=False)
        config = load_config(folder / "config.yaml", overrides)
        results.append(evaluate_run(folder, config, progress=False)[0])
    assert [r.method for r in results] == ["MAML", "ADML"]
    for result in results:
        assert result.protocol == "literature" and result.num_tasks == 3
        assert [s.scenario for s in result.scenarios] == ["Clean-Clean", "Clean-Adversarial"]
        assert result.attacks == ["PGD(eps=0.0313725, steps=2, step_size=0.00784314, "
                                  "random_start=True)"]  # fmt: skip
    assert len(seen["MAML"]) == 3
    for maml_task, adml_task in zip(seen["MAML"], seen["ADML"], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(maml_task, adml_task, strict=True))
    assert not torch.equal(seen["MAML"][0].query_inputs, seen["MAML"][1].query_inputs)


def _loss(model: nn.Module, params: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(torch.func.functional_call(model, params, (x,)), y)


def _reference_pgd(model, params, x, y, noise, eps, step):  # noqa: ANN001, ANN202
    """PGD-20 by hand: random start, 20 signed steps, each projected on the ball and [0, 1]."""
    adversarial = (x + noise).clamp(0, 1)
    for _ in range(20):
        adversarial.requires_grad_(True)
        (gradient,) = torch.autograd.grad(_loss(model, params, adversarial, y), adversarial)
        moved = adversarial.detach() + step * gradient.sign()
        adversarial = torch.min(torch.max(moved, x - eps), x + eps).clamp(0, 1)
    return adversarial


def test_the_query_is_attacked_against_the_adapted_parameters() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    labels = torch.arange(3)
    task = Task(torch.rand(3, 6, dtype=torch.float64), labels,
                torch.rand(12, 6, dtype=torch.float64), labels.repeat(4))  # fmt: skip
    settings = load_config(None, [*DIGITS, "evaluate.protocol=literature"])["evaluate"]
    lr, steps, seed = 0.5, 3, settings["seed"]
    learner, options = GradientLearner(model, lr=lr, steps=steps), evaluation_options(settings)
    clean, attacked = evaluate(learner, [task], method="M", **options).scenarios
    every_step = evaluate(learner, [task], method="M", **{**options, "curves": True}).scenarios
    # by hand: SGD from theta on the clean support, then PGD-20 against each step's model
    params = {name: p.detach() for name, p in model.named_parameters()}
    trajectory = [params]
    for _ in range(steps):
        current = {name: p.requires_grad_(True) for name, p in trajectory[-1].items()}
        grads = torch.autograd.grad(_loss(model, current, task.support_inputs, labels),
                                    list(current.values()))  # fmt: skip
        trajectory.append({n: (p - lr * g).detach() for (n, p), g in zip(current.items(), grads,
                                                                       strict=True)})  # fmt: skip
    eps, step = 8 / 255, 2 / 255
    expected = []
    for k, adapted in enumerate(trajectory):
        generator = torch.Generator().manual_seed(
            derive_seed(derive_seed(seed, 0), QUERY_STREAM, k)
        )
        noise = (2 * torch.rand(task.query_inputs.shape, generator=generator,
                                dtype=torch.float64) - 1) * eps  # fmt: skip
        query = _reference_pgd(
            model, adapted, task.query_inputs, task.query_labels, noise, eps, step
        )
        with torch.no_grad():
            expected.append(float(_loss(model, adapted, query, task.query_labels)))
    assert attacked.loss_curve == pytest.approx(expected[-1:], rel=1e-9, abs=1e-12)
    assert every_step[1].loss_curve == pytest.approx(expected, rel=1e-9, abs=1e-12)
    with torch.no_grad():
        clean_loss = float(_loss(model, trajectory[-1], task.query_inputs, task.query_labels))
    assert clean.loss == pytest.approx(clean_loss, rel=1e-9)
    assert attacked.loss > clean.loss  # the attack raises the adapted model's loss
    # the step-0 point is the attack on theta; the scored model after adaptation differs
    assert expected[-1] != pytest.approx(expected[0], rel=1e-6)


def benchmark_script() -> Any:
    """examples/benchmark.py as a module."""
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "examples/benchmark.py")
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


@pytest.mark.parametrize("protocol", ["paper", "adapted"])
@pytest.mark.parametrize("engine", ["sequential", "vmap"])
def test_the_last_step_alone_gives_the_table_entries_of_the_whole_curve(
    protocol: str, engine: str
) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    labels = torch.arange(3).repeat(2)
    tasks = [Task(torch.rand(6, 6, dtype=torch.float64), labels,
                  torch.rand(9, 6, dtype=torch.float64), torch.arange(3).repeat(3))
             for _ in range(3)]  # fmt: skip
    options = {"method": "M", "protocol": protocol, "engine": engine, "epsilons": [8.0, 16.0],
               "make_attack": functools.partial(PGD, steps=3), "seed": 5, "chunk_size": 2}  # fmt: skip
    learner = GradientLearner(model, lr=0.5, steps=2)
    whole, last = (evaluate(learner, tasks, curves=c, **options) for c in (True, False))
    assert len(whole.scenarios) == len(last.scenarios) == 12  # 2 shots: 40 % rows too
    for full, final in zip(whole.scenarios, last.scenarios, strict=True):
        assert len(full.accuracy_curve) == 3 and len(final.accuracy_curve) == 1
        assert final.task_accuracies == full.task_accuracies
        assert final.loss == pytest.approx(full.loss, rel=1e-12)
        assert final.loss_curve == pytest.approx(full.loss_curve[-1:], rel=1e-12)


def test_the_benchmark_runs_end_to_end_on_generated_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for mode, classes in (("train", 6), ("validation", 5), ("test", 5)):
        write_mini_imagenet_cache(data, mode, num_classes=classes, images_per_class=4,
                                  image_size=16)  # fmt: skip
    script = benchmark_script()
    overrides = ["dataset.strict=false", "train.iterations=1", "model.hidden=4", "task.query_shots=1",
                 "train.adaptation_steps=1", "train.meta_batch_size=1", "train.pgd_steps=1",
                 "train.validate_every=null", "evaluate.tasks=3", "evaluate.adaptation_steps=1",
                 "evaluate.pgd_steps=3"]  # fmt: skip
    argv = ["--dataset", "mini-imagenet", "--shots", "1", "--root", str(data), "--output",
            str(tmp_path / "out"), "--methods", "maml", "r-maml-ce", "r-maml-trades", "--seeds", "0", "1"]  # fmt: skip
    argv += [flag for override in overrides for flag in ("-o", override)]
    assert script.benchmark([*argv, "--only-seed", "1"]) == 0
    out = tmp_path / "out" / "mini-imagenet-5w1s"
    assert not (out / "maml" / "seed-0").exists() and not (out / "benchmark.md").exists()
    assert script.benchmark(argv) == 0  # seed 1 continues (finished), seed 0 trains
    assert "robust_loss: trades" in (out / "r-maml-trades" / "seed-0" / "config.yaml").read_text()
    table = json.loads((out / "benchmark.json").read_text())
    assert table["dataset"] == "MiniImageNet" and table["shots"] == 1
    paper, literature = table["protocols"]["paper"], table["protocols"]["literature"]
    names = {"MAML": "maml", "R-MAML (CE)": "r-maml-ce", "R-MAML (TRADES)": "r-maml-trades"}
    assert [row["method"] for row in literature["rows"]] == list(names)  # one row per variant
    assert [(c["support"], c["query"], c["epsilon"]) for c in literature["columns"]] == [
        ("clean", "clean", 8.0), ("clean", "adversarial", 8.0)]  # fmt: skip
    assert len(paper["columns"]) == 8  # 4 scenarios (1 shot) x eps 2 and 0.2
    # every cell: the mean over the two seeds of what each run's own evaluation says
    for protocol, name in (
        ("paper", "evaluation.json"),
        ("literature", "evaluation-literature.json"),
    ):
        part = table["protocols"][protocol]
        for row in part["rows"]:
            method = names[row["method"]]
            runs = [load_results(out / method / f"seed-{s}" / name)[0] for s in (0, 1)]
            assert {r.protocol for r in runs} == {protocol}
            for column, cell in zip(part["columns"], row["cells"], strict=True):
                values = [r.find(column["support"], column["query"], column["epsilon"]).accuracy
                          for r in runs]  # fmt: skip
                assert cell["per_seed"] == values and cell["seeds"] == [0, 1]
                assert cell["accuracy"] == pytest.approx(sum(values) / 2)
        comparison = next(c for c in part["comparisons"] if c["query"] == "adversarial")
        assert (comparison["first"], comparison["second"], comparison["seeds"]) == (
            "MAML", "R-MAML (CE)", 2)  # fmt: skip
        assert comparison["tasks"] == 3
    markdown = (out / "benchmark.md").read_text()
    assert "#### Protocol `literature`" in markdown and "| R-MAML (TRADES) | " in markdown
    assert "Paired differences over 2 training seed(s) x 3 shared test tasks" in markdown


def test_the_benchmark_refuses_bad_arguments_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = benchmark_script()
    argv = ["--dataset", "cifar-fs", "--shots", "1", "--root", str(tmp_path / "missing"),
            "--output", str(tmp_path / "out"), "--methods", "maml"]  # fmt: skip
    assert script.benchmark(argv) == 2
    assert "error: dataset.root" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        script.benchmark([*argv, "--seeds", "0", "--only-seed", "3"])
    assert (
        stop.value.code == 2 and "--only-seed 3 must be one of --seeds" in capsys.readouterr().err
    )
