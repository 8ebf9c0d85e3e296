"""The command line end to end: train, evaluate, report, quickstart and the reproduction script,
on small data (bundled digits, and MiniImageNet caches generated in the exact on-disk format)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from data_factories import write_mini_imagenet_cache, write_tiered_imagenet

from l2l_adversarial.app.cli import build_parser, main

ROOT = Path(__file__).parents[1]
SMALL = ["-o", "model.hidden=8", "-o", "task.query_shots=3", "-o", "train.adaptation_steps=1",
         "-o", "train.meta_batch_size=2", "-o", "evaluate.tasks=3", "-o", "evaluate.adaptation_steps=2",
         "--quiet"]  # fmt: skip


def test_train_evaluate_report_on_digits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "adml"
    assert (
        main(
            [
                "train",
                "-o",
                "dataset.name=digits",
                "-o",
                "train.iterations=3",
                "--run-dir",
                str(run),
                *SMALL,
            ]
        )
        == 0
    )
    assert {p.name for p in run.iterdir()} >= {
        "config.yaml",
        "metrics.csv",
        "checkpoint.pt",
        "summary.json",
    }
    assert main(["evaluate", str(run), *SMALL]) == 0
    results = json.loads((run / "evaluation.json").read_text())
    scenarios = results[0]["scenarios"]
    assert {(s["support"], s["query"]) for s in scenarios} == {
        (support, query)
        for support in ("clean", "adversarial")
        for query in ("clean", "adversarial")
    }
    assert all(len(s["accuracy_curve"]) == 3 for s in scenarios)  # steps 0..2
    assert main(["evaluate", str(run), *SMALL]) == 2  # results are not overwritten silently
    assert "already exist" in capsys.readouterr().err
    assert results[0]["engine"] == "sequential"  # evaluate.engine: auto
    vmap = ["-o", "evaluate.engine=vmap", "-o", "evaluate.chunk_size=2", "--overwrite"]
    assert main(["evaluate", str(run), *SMALL, *vmap]) == 0
    batched = json.loads((run / "evaluation.json").read_text())[0]
    assert batched["engine"] == "vmap" and batched["num_tasks"] == results[0]["num_tasks"]
    assert [(s["support"], s["query"], s["epsilon"]) for s in batched["scenarios"]] == [
        (s["support"], s["query"], s["epsilon"]) for s in scenarios
    ]
    assert main(["report", str(run / "evaluation.json"), "--output", str(tmp_path / "report")]) == 0
    written = {p.suffix for p in (tmp_path / "report").iterdir()}
    assert written >= {".md", ".json", ".png"}
    assert "| ADML | Clean |" in capsys.readouterr().out


def test_bad_config_is_rejected_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    status = main(
        ["train", "-o", "dataset.name=digits", "-o", "train.meta_lr=-0.1", "--run-dir", str(run)]
    )
    assert status == 2 and not run.exists()
    assert "train.meta_lr: min value is 1e-12" in capsys.readouterr().err
    assert main(["train", "-o", "dataset.name=mini-imagenet", "--run-dir", str(run)]) == 2
    assert "dataset.root is required" in capsys.readouterr().err


def test_missing_dataset_file_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["train", "-o", f"dataset.root={tmp_path}", "--run-dir", str(tmp_path / "run")])
    assert status == 2
    assert "mini-imagenet-cache-train.pkl" in capsys.readouterr().err


def test_quickstart_runs_and_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["quickstart", "--iterations", "2", "--tasks", "2", "--output", str(tmp_path), "--quiet",
                   "-o", "model.hidden=8", "-o", "train.adaptation_steps=1", "-o", "evaluate.adaptation_steps=1"])  # fmt: skip
    assert status == 0
    out = capsys.readouterr().out
    assert "| MAML | Clean |" in out and "| ADML | Adversarial |" in out


def reproduction_script(data: Path, images_per_class: int) -> Any:
    """examples/reproduce.py as a module, with generated 16x16 MiniImageNet caches in ``data``."""
    for mode, classes in (("train", 6), ("validation", 5), ("test", 5)):
        write_mini_imagenet_cache(
            data, mode, num_classes=classes, images_per_class=images_per_class, image_size=16
        )
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "examples" / "reproduce.py")
    assert spec is not None and spec.loader is not None
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    return reproduce


def test_reproduction_script_end_to_end_on_generated_mini_imagenet(tmp_path: Path) -> None:
    reproduce = reproduction_script(tmp_path / "data", images_per_class=8)
    overrides = ["dataset.strict=false", "train.iterations=2", "model.hidden=8", "task.query_shots=3",
                 "train.adaptation_steps=1", "train.meta_batch_size=2", "evaluate.tasks=2",
                 "evaluate.adaptation_steps=2"]  # fmt: skip
    argv = ["--dataset", "mini-imagenet", "--shots", "5", "--root", str(tmp_path / "data"),
            "--output", str(tmp_path / "out"), "--methods", "maml", "adml", "matching-nets"]  # fmt: skip
    argv += [flag for override in overrides for flag in ("-o", override)]
    assert reproduce.reproduce(argv) == 0
    report = tmp_path / "out" / "mini-imagenet-5w5s" / "report"
    table = (report / "table2.md").read_text()
    assert "61.45 ± 0.91" in table  # the paper's MAML Clean-Clean, beside ours
    assert "| Matching Nets | 40% |" in table
    assert (report / "table2_accuracy.png").stat().st_size > 5000
    assert reproduce.reproduce(argv) == 0  # a second run resumes the finished runs


def test_reproduction_script_runs_a_dataset_beyond_the_papers(tmp_path: Path) -> None:
    """tieredImageNet with MiniImageNet's settings: trains, evaluates and reports without a
    paper column."""
    for mode in ("train", "validation", "test"):
        write_tiered_imagenet(tmp_path / "data", mode, num_classes=5, images_per_class=4,
                              image_size=16)  # fmt: skip
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "examples" / "reproduce.py")
    assert spec is not None and spec.loader is not None
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    overrides = ["dataset.strict=false", "train.iterations=1", "model.hidden=4", "task.query_shots=2",
                 "train.adaptation_steps=1", "train.meta_batch_size=1", "evaluate.tasks=2",
                 "evaluate.adaptation_steps=1"]  # fmt: skip
    argv = ["--dataset", "tiered-imagenet", "--shots", "1", "--root", str(tmp_path / "data"),
            "--output", str(tmp_path / "out"), "--methods", "maml"]  # fmt: skip
    argv += [flag for override in overrides for flag in ("-o", override)]
    assert reproduce.reproduce(argv) == 0
    run = tmp_path / "out" / "tiered-imagenet-5w1s" / "maml"
    assert "tiered-imagenet" in (run / "config.yaml").read_text()
    results = json.loads((run / "evaluation.json").read_text())
    assert {result["dataset"] for result in results} == {"tieredImageNet"}
    assert any((tmp_path / "out" / "tiered-imagenet-5w1s" / "report").iterdir())


def test_module_entry_point_prints_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "l2l_adversarial", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "quickstart" in result.stdout


REST_MARKUP = re.compile(r"``|:(func|class|mod|meth|attr|data|exc):|`[^`\n]+`_|\.\. \w+::")


def help_texts() -> dict[str, str]:
    """The ``--help`` of the command and of each subcommand, as printed."""
    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    texts = {"l2l-adversarial": parser.format_help()}
    texts.update({name: sub.format_help() for name, sub in commands.choices.items()})
    return texts


def test_help_is_plain_text_with_every_option_explained_and_the_guide_named() -> None:
    parser = build_parser()
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"train", "evaluate", "report", "quickstart", "configs"}
    for name, text in help_texts().items():
        assert not REST_MARKUP.search(text), (name, REST_MARKUP.search(text))
        assert "the documentation: docs/ (mkdocs serve)" in text, name
        assert re.search(r"\b(getting-started|reproducing|runs)\.md\b", text), name
        # no sentence cut off: every paragraph of prose ends with a full stop
        description = text.split("\n\n")[1]
        assert description.rstrip().endswith("."), (name, description)
        assert text.rstrip().endswith("(mkdocs serve)."), name
    for sub in [parser, *commands.choices.values()]:
        for action in sub._actions:
            assert action.help and action.help.strip(), (sub.prog, action.dest)
            assert "\n" not in action.help and not action.help.endswith((",", ";", ":")), (
                action.help
            )
    for choice in commands._choices_actions:  # one line each in the command list
        assert choice.help and len(choice.help) < 100 and not choice.help.endswith("."), choice


def test_train_and_evaluate_several_training_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "maml"
    common = ["-o", "dataset.name=digits", "-o", "method=maml", *SMALL]
    assert main(["train", "--seeds", "3", "1", "-o", "train.iterations=2",
                 "--run-dir", str(run), *common]) == 0  # fmt: skip
    assert sorted(p.name for p in run.iterdir()) == ["seed-1", "seed-3"]
    assert "seed: 3" in (run / "seed-3" / "config.yaml").read_text()
    weights = [torch.load(run / f"seed-{s}" / "checkpoint.pt")["learner"] for s in (1, 3)]
    assert any(
        not torch.equal(a, b) for a, b in zip(weights[0].values(), weights[1].values(), strict=True)
    )
    capsys.readouterr()
    assert main(["evaluate", str(run), *common]) == 0
    out = capsys.readouterr().out
    saved = [json.loads((run / f"seed-{s}" / "evaluation.json").read_text()) for s in (1, 3)]
    assert [r[0]["training_seed"] for r in saved] == [1, 3]
    clean = [r[0]["scenarios"][0]["accuracy"] for r in saved]
    mean = f"{sum(clean) / 2:.2f} ± "
    assert f"| MAML | Clean | {mean}" in out and "[" in out  # mean ± spread [task interval]


def test_reproduction_script_with_seeds_reports_spread_and_paired_comparisons(
    tmp_path: Path,
) -> None:
    reproduce = reproduction_script(tmp_path / "data", images_per_class=6)
    overrides = ["dataset.strict=false", "train.iterations=1", "model.hidden=4", "task.query_shots=1",
                 "train.adaptation_steps=1", "train.meta_batch_size=1", "evaluate.tasks=2",
                 "evaluate.adaptation_steps=1", "evaluate.eps=[2]"]  # fmt: skip
    argv = ["--dataset", "mini-imagenet", "--shots", "1", "--root", str(tmp_path / "data"),
            "--output", str(tmp_path / "out"), "--methods", "maml", "adml", "--seeds", "0", "1"]  # fmt: skip
    argv += [flag for override in overrides for flag in ("-o", override)]
    assert reproduce.reproduce([*argv, "--only-seed", "1"]) == 0  # one seed in its own process
    out = tmp_path / "out" / "mini-imagenet-5w1s"
    assert (out / "adml" / "seed-1" / "evaluation.json").exists()
    assert not (out / "adml" / "seed-0").exists() and not (out / "report").exists()
    assert reproduce.reproduce(argv) == 0
    table = (out / "report" / "table1.md").read_text()
    assert "Paired differences over 2 training seed(s) x 2 shared test tasks" in table
    assert "- MAML − ADML, Clean-Adversarial, ε = 2: " in table
    assert "training seed 0" in table and "training seed 1" in table
    entries = json.loads((out / "report" / "table1.json").read_text())["entries"]
    ours = next(e["ours"] for e in entries if e["method"] == "ADML" and e["ours"])
    assert len(ours["per_seed"]) == 2 and ours["seeds"] == [0, 1]
