"""The fail-safe campaign: bad inputs and faults, each through the command line in-process.

Every case asserts the exit status, that the message is one line matching a pattern, and
that no file under the case's folder (a trained and evaluated run folder, plus anything the
case set up) changed: the run folder's ``.lock`` aside, which only holds the last writer's process id.
A case's outcome is one of ``handled``, ``traceback`` (an exception escaped, or an internal
error was reported for a user's mistake), ``accepted`` (exit 0 for a bad input), ``lost``
(a file changed or vanished) or ``unclear`` (another status, or another message).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from l2l_adversarial.app.checkpoint import save_checkpoint
from l2l_adversarial.app.cli import main

TINY = ["-o", "dataset.name=digits", "-o", "dataset.image_size=16", "-o", "device=cpu",
        "-o", "model.hidden=4", "-o", "task.ways=3", "-o", "task.shots=1", "-o", "task.query_shots=2",
        "-o", "train.iterations=2", "-o", "train.meta_batch_size=1", "-o", "train.adaptation_steps=1",
        "-o", "train.checkpoint_every=1", "-o", "train.inner_lr=0.1", "-o", "evaluate.tasks=2",
        "-o", "evaluate.adaptation_steps=1", "-o", "evaluate.eps=[2]", "--quiet"]  # fmt: skip
CONFIG_ERROR = r"error: invalid configuration \(\d problems?\): .*; fix th(is key|ese keys)$"
CUDA = torch.cuda.is_available()


@dataclass
class Case:
    """One bad input: ``argv`` with ``{run}`` and ``{tmp}`` filled in, run after ``setup``."""

    family: str
    name: str
    argv: list[str]
    first_line: str  # a regular expression the first line of stderr must match
    code: int = 2
    setup: Callable[[Path, Path], None] | None = None
    mentions: list[str] = field(default_factory=list)  # also somewhere in the message
    keep: Callable[[Path], list[str]] | None = None  # the files that must not change


def train_cmd(*extra: str) -> list[str]:
    return ["train", "--run-dir", "{run}", *TINY, *extra]


def overwrite(*extra: str) -> list[str]:
    return train_cmd("--overwrite", *extra)


def cases() -> list[Case]:
    found: list[Case] = []

    def add(family: str, name: str, argv: list[str], first_line: str, **options: object) -> None:
        found.append(Case(family, name, argv, first_line, **options))  # type: ignore[arg-type]

    # -- config values through -o, on train --overwrite of a finished run ---------------------
    numbers = ["train.inner_lr", "train.clean_inner_lr", "train.meta_lr", "train.clean_meta_lr",
               "train.eps", "train.adversarial_fraction", "train.max_loss", "evaluate.inner_lr"]  # fmt: skip
    for key in numbers:
        for value in (".nan", ".inf", "-.inf", "true", "fast"):
            add("config", f"{key}={value}", overwrite("-o", f"{key}={value}"), CONFIG_ERROR,
                mentions=[f"{key}:", f"set by -o {key}={value}"])  # fmt: skip
    for value in ("[.nan]", "[.inf]", "[true]", "[]", "2"):
        add("config", f"evaluate.eps={value}", overwrite("-o", f"evaluate.eps={value}"),
            CONFIG_ERROR, mentions=["evaluate.eps"])  # fmt: skip
    integers = ["seed", "task.ways", "task.shots", "task.query_shots", "model.hidden",
                "train.iterations", "train.meta_batch_size", "train.adaptation_steps",
                "train.pgd_steps", "train.checkpoint_every", "train.log_every", "evaluate.tasks",
                "evaluate.adaptation_steps", "evaluate.pgd_steps", "evaluate.seed",
                "dataset.image_size"]  # fmt: skip
    for key in integers:
        for value in ("true", "1.5", "-1", ".nan"):
            add("config", f"{key}={value}", overwrite("-o", f"{key}={value}"), CONFIG_ERROR,
                mentions=[f"{key}:", f"set by -o {key}={value}"])  # fmt: skip
        add(
            "config",
            f"{key}= (empty)",
            overwrite("-o", f"{key}="),
            rf"error: override '{re.escape(key)}=' has no value, on the command line; ",
        )
    choices = {"method": "reptile", "device": "gpu", "dataset.name": "imagenet",
               "train.attack": "cw", "train.meta_update": "alternating",
               "train.attack_target": "final", "evaluate.protocol": "transductive",
               "evaluate.attack": "ffgsm", "train.first_order": "maybe", "model.fce": "2",
               "dataset.strict": "sure", "dataset.download": "7", "run_dir": "[1]",
               "train.channels_last": "fast"}  # fmt: skip
    for key, value in choices.items():
        add("config", f"{key}={value}", overwrite("-o", f"{key}={value}"), CONFIG_ERROR,
            mentions=[f"{key}:"])  # fmt: skip
    for text in ("train.itterations=5", "colour=red", "train.eps.x=1", "task.ways.n=3"):
        add(
            "config",
            f"unknown {text}",
            overwrite("-o", text),
            r"error: (invalid configuration|override '.*': '.*' is 3, not a section \(set by -o task.ways=3\))",
        )
    for text in (
        "train.eps=[1,",
        "evaluate.eps={a",
        'train.attack="pgd',
        "train.eps=@2",
        "seed=%x",
    ):
        add(
            "config",
            f"malformed {text}",
            overwrite("-o", text),
            rf"error: override '{re.escape(text)}': the value is not valid YAML",
        )
    for text in ("=5", "train.=1", ".eps=1", "train..eps=1", "iterations"):
        add(
            "config",
            f"no key {text}",
            overwrite("-o", text),
            rf"error: override '{re.escape(text)}' is not key.subkey=value",
        )
    add(
        "config",
        "sequential matching nets",
        overwrite("-o", "method=matching-nets", "-o", "train.meta_update=sequential"),
        r"error: train.meta_update: 'sequential' applies to method adml only; ",
    )
    add("config", "images too small for the CNN", overwrite("-o", "dataset.image_size=8"),
        r"error: the digits images are 8 x 8 pixels, too small for the 4-layer CNN .*; set "
        r"dataset.image_size to 16 or more$")  # fmt: skip
    add("config", "autoattack on 3-way tasks", ["evaluate", "{run}", "--overwrite", "--quiet",
        "-o", "evaluate.attack=autoattack"], r"error: evaluate.attack: autoattack needs "
        r"task.ways >= 4 .*, not 3; use evaluate.attack=pgd")  # fmt: skip
    add(
        "config",
        "resume and overwrite",
        train_cmd("--resume", "--overwrite"),
        r"error: --resume and --overwrite contradict each other",
    )
    add(
        "config",
        "accept without resume",
        overwrite("--accept-changes", "seed"),
        r"error: --accept-changes applies to --resume only",
    )

    # -- config files ----------------------------------------------------------------------
    files = {
        "duplicate key": b"method: adml\nmethod: maml\n",
        "duplicate nested key": b"train:\n  meta_lr: 0.1\n  meta_lr: 0.2\n",
        "not UTF-8": b"method: adml # caf\xe9\n",
        "a list": b"- method\n",
        "a scalar": b"adml\n",
        "bad YAML": b"train: [unclosed\n",
        "tab indentation": b"train:\n\tmeta_lr: 0.1\n",
        "NaN in file": b"train: {eps: .nan}\n",
        "boolean in file": b"evaluate: {pgd_steps: true}\n",
        "unknown key in file": b"trian: {eps: 2}\n",
        "section is a number": b"train: 3\n",
    }
    for name, content in files.items():

        def write(run: Path, tmp: Path, content: bytes = content) -> None:
            (tmp / "bad.yaml").write_bytes(content)

        add("config file", name, ["train", "{tmp}/bad.yaml", "--run-dir", "{run}", "--overwrite",
            *TINY], r"error: (config file '.*bad.yaml' |invalid configuration|override .* is 3, not a section \(in '.*bad.yaml'\))",
            setup=write)  # fmt: skip
    add(
        "config file",
        "a folder",
        ["train", "{tmp}", "--run-dir", "{run}", "--overwrite", *TINY],
        r"error: config '.*' is a folder, not a file; ",
    )
    add(
        "config file",
        "missing",
        ["train", "{tmp}/none.yaml", "--run-dir", "{run}", *TINY],
        r"error: config file '.*none.yaml' not found; ",
    )

    # -- device and data, before the run folder is touched --------------------------------
    if not CUDA:
        for device in ("cuda", "cuda:0", "cuda:3"):
            add("device", device, overwrite("-o", f"device={device}"),
                rf"error: device '{device}' is not available, CUDA is missing")  # fmt: skip
            add("device", f"evaluate {device}", ["evaluate", "{run}", "--overwrite", "--quiet",
                "-o", f"device={device}"], rf"error: device '{device}' is not available")  # fmt: skip
    add("data", "no root", overwrite("-o", "dataset.name=mini-imagenet", "-o", "dataset.image_size=null"),
        r"error: dataset.root is required for dataset 'mini-imagenet'")  # fmt: skip
    add("data", "root missing", overwrite("-o", "dataset.name=cifar100", "-o", "dataset.image_size=null",
        "-o", "dataset.root={tmp}/nowhere"), r"error: dataset.root '.*nowhere' does not exist")  # fmt: skip
    add("data", "root is a file", overwrite("-o", "dataset.name=cifar100", "-o", "dataset.image_size=null",
        "-o", "dataset.root={run}/config.yaml"), r"error: dataset.root '.*' does not exist")  # fmt: skip
    add("data", "image_size on mini-imagenet", overwrite("-o", "dataset.name=mini-imagenet",
        "-o", "dataset.root={tmp}"),
        r"error: dataset.image_size applies to .*digits only, not 'mini-imagenet'")  # fmt: skip
    for name, content in {"empty cache": b"", "garbage cache": b"\x00" * 64,
                          "text cache": b"not a pickle"}.items():  # fmt: skip

        def cache(run: Path, tmp: Path, content: bytes = content) -> None:
            (tmp / "data").mkdir()
            (tmp / "data" / "mini-imagenet-cache-train.pkl").write_bytes(content)

        add("data", name, overwrite("-o", "dataset.name=mini-imagenet", "-o", "dataset.image_size=null",
            "-o", "dataset.root={tmp}/data"), r"error: .*mini-imagenet-cache-train.pkl", setup=cache)  # fmt: skip

    def no_cache(run: Path, tmp: Path) -> None:
        (tmp / "data").mkdir()

    add("data", "cache missing", overwrite("-o", "dataset.name=mini-imagenet", "-o", "dataset.image_size=null",
        "-o", "dataset.root={tmp}/data"),
        r"error: no mini-imagenet train split of any known format in .* \(looked for ",
        setup=no_cache, mentions=["mini-imagenet-cache-train.pkl", "docs/data-formats.md"])  # fmt: skip

    # -- resume with other settings -------------------------------------------------------
    changed = ["seed=1", "train.meta_lr=0.002", "train.inner_lr=0.2", "train.eps=4",
               "train.attack=pgd", "train.adaptation_steps=2", "train.first_order=true",
               "train.meta_update=sequential", "train.attack_target=adapted",
               "train.clean_inner_lr=0.05", "train.meta_batch_size=2",
               "dataset.image_size=20"]  # fmt: skip
    for text in changed:
        key = text.split("=")[0]
        add("resume", f"changed {text}", train_cmd("--resume", "-o", text),
            r"error: resuming with a changed config, '.*checkpoint.pt' was trained with other",
            mentions=[f"--accept-changes {key}"])  # fmt: skip
    for text in ("method=maml", "task.ways=4", "task.shots=2", "model.hidden=8"):
        add(
            "resume",
            f"other model {text}",
            train_cmd("--resume", "-o", text),
            r"error: checkpoint '.*checkpoint.pt' belongs to a different run \(",
        )
    add(
        "resume",
        "accepting an unchanged key",
        train_cmd("--resume", "--accept-changes", "seed"),
        r"error: --accept-changes names seed, which did not change",
    )
    add("resume", "accepting one of two changes", train_cmd("--resume", "-o", "seed=2", "-o",
        "train.meta_lr=0.01", "--accept-changes", "seed"), r"error: resuming with a changed config",
        mentions=["--accept-changes train.meta_lr"])  # fmt: skip
    add("resume", "a finished run", train_cmd("--resume"), r"trained adml( \(seed 0\))?: ", code=0)
    add("resume", "a finished run, longer log interval", train_cmd("--resume", "-o", "train.log_every=5"),
        r"trained adml( \(seed 0\))?: ", code=0)  # fmt: skip

    # -- damaged or foreign checkpoints, for train --resume and evaluate --overwrite -------
    def damage(transform: Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
        def setup(run: Path, tmp: Path) -> None:
            path = run / "checkpoint.pt"
            path.write_bytes(transform(path.read_bytes()))

        return setup

    def scribble(fraction: float) -> Callable[[bytes], bytes]:
        def transform(data: bytes) -> bytes:
            at = int(len(data) * fraction)
            noise = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(at))
            return data[:at] + bytes(noise.tolist()) + data[at + 64 :]

        return transform

    def rewrite(change: Callable[[dict], None]) -> Callable[[Path, Path], None]:
        def setup(run: Path, tmp: Path) -> None:
            path = run / "checkpoint.pt"
            state = torch.load(path, weights_only=True)
            change(state)
            kind = state.pop("kind")
            save_checkpoint(path, {k: v for k, v in state.items()
                                   if k not in ("format", "version", "digest")}, kind=kind)  # fmt: skip

        return setup

    def nan_weights(state: dict) -> None:
        next(iter(state["learner"].values())).fill_(float("nan"))

    def foreign(**options: str) -> Callable[[Path, Path], None]:
        def setup(run: Path, tmp: Path) -> None:
            other = tmp / "other"
            extra = [a for key, value in options.items() for a in ("-o", f"{key}={value}")]
            assert main(["train", "--run-dir", str(other), *TINY, *extra]) == 0
            shutil.copyfile(other / "checkpoint.pt", run / "checkpoint.pt")
            shutil.rmtree(other)

        return setup

    def evil(run: Path, tmp: Path) -> None:
        class Exploit:
            def __reduce__(self):  # noqa: ANN204
                return (Path.touch, (tmp / "executed",))

        torch.save({"format": "l2l-adversarial-checkpoint", "x": Exploit()}, run / "checkpoint.pt")

    def replace_with(content: bytes | None) -> Callable[[Path, Path], None]:
        def setup(run: Path, tmp: Path) -> None:
            (run / "checkpoint.pt").unlink()
            if content is not None:
                (run / "checkpoint.pt").write_bytes(content)

        return setup

    def a_folder(run: Path, tmp: Path) -> None:
        (run / "checkpoint.pt").unlink()
        (run / "checkpoint.pt").mkdir()

    def flip_a_weight_bit(run: Path, tmp: Path) -> None:
        path = run / "checkpoint.pt"
        data = path.read_bytes()
        weights = next(iter(torch.load(path, weights_only=True)["learner"].values()))
        at = data.index(weights.numpy().tobytes()) + 3
        path.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :])

    corrupt = r"error: checkpoint '.*checkpoint.pt' is (corrupt|damaged)"
    damaged = {
        **{f"truncated to {p}%": (damage(lambda d, p=p: d[: len(d) * p // 100]), corrupt)
           for p in (1, 10, 30, 50, 70, 90, 99)},  # fmt: skip
        **{f"64 random bytes at {int(f * 100)}%": (damage(scribble(f)), corrupt)
           for f in (0.3, 0.5, 0.7, 0.9)},  # fmt: skip
        "one bit flipped in the weights": (flip_a_weight_bit, corrupt),
        "empty": (replace_with(b""), corrupt),
        "zeros": (replace_with(bytes(4096)), corrupt),
        "JSON": (replace_with(b'{"iteration": 2}'), corrupt),
        "missing": (replace_with(None), r"error: (no checkpoint|--resume: no checkpoint)"),
        "a folder": (a_folder, r"error: (no checkpoint|--resume: no checkpoint)"),
        "malicious pickle": (evil, corrupt),
        "another kind": (rewrite(lambda s: s.update(kind="evaluate")), r"error: '.*' is a 'evaluate' checkpoint"),
        "NaN weights": (rewrite(nan_weights), r"error: checkpoint '.*' holds non-finite weights"),
        "other seed": (foreign(seed="5"), r"error: (resuming with a changed config|checkpoint '.*' was trained with other settings)"),
        "other learning rate": (foreign(**{"train.meta_lr": "0.01"}), r"error: (resuming with a changed config|checkpoint '.*' was trained with other settings)"),
        "other method": (foreign(method="maml"), r"error: checkpoint '.*' belongs to a different run"),
    }  # fmt: skip
    for name, (setup, message) in damaged.items():
        resume = train_cmd("--resume", "-o", "train.iterations=3")
        add("checkpoint", f"resume: {name}", resume, message, setup=setup)
        add("checkpoint", f"evaluate: {name}", ["evaluate", "{run}", "--overwrite", "--quiet"],
            message, setup=setup)  # fmt: skip

    # -- run folders and the overwrite rule -----------------------------------------------
    add(
        "run folder",
        "train over results",
        train_cmd(),
        r"error: run folder '.*' already holds results",
    )
    add("run folder", "train over results, other config", train_cmd("-o", "seed=3"),
        r"error: run folder '.*' already holds results")  # fmt: skip
    add(
        "run folder",
        "evaluate over evaluation.json",
        ["evaluate", "{run}", "--quiet"],
        r"error: results already exist, '.*evaluation.json'; pass --overwrite",
    )
    add(
        "run folder",
        "evaluate a folder that is no run",
        ["evaluate", "{tmp}", "--quiet"],
        r"error: not a run folder, '.*' has no config.yaml",
    )
    add(
        "run folder",
        "evaluate a missing folder",
        ["evaluate", "{tmp}/nowhere", "--quiet"],
        r"error: not a run folder",
    )
    add(
        "run folder",
        "evaluate a file",
        ["evaluate", "{run}/metrics.csv", "--quiet"],
        r"error: not a run folder",
    )
    add(
        "run folder",
        "evaluate with other training settings",
        ["evaluate", "{run}", "--overwrite", "--quiet", "-o", "train.meta_lr=0.5"],
        r"error: checkpoint '.*' was trained with other settings than its config.yaml",
    )
    add(
        "run folder",
        "evaluate with a bad override",
        ["evaluate", "{run}", "--overwrite", "--quiet", "-o", "evaluate.tasks=0"],
        CONFIG_ERROR,
    )

    def garbage_config(run: Path, tmp: Path) -> None:
        (run / "config.yaml").write_bytes(b"train: [\n")

    add("run folder", "evaluate with a corrupt config.yaml", ["evaluate", "{run}", "--overwrite",
        "--quiet"], r"error: config file '.*config.yaml' is not valid YAML", setup=garbage_config)  # fmt: skip

    def reported(run: Path, tmp: Path) -> None:
        assert main(["report", str(run / "evaluation.json"), "--output", str(tmp / "report")]) == 0

    add("run folder", "report over a report", ["report", "{run}/evaluation.json", "--output",
        "{tmp}/report"], r"error: results already exist, '.*'; pass --overwrite", setup=reported)  # fmt: skip

    def results_file(content: bytes) -> Callable[[Path, Path], None]:
        def setup(run: Path, tmp: Path) -> None:
            (tmp / "results.json").write_bytes(content)

        return setup

    for name, content in {"not JSON": b"[{", "not UTF-8": b'["\xff"]', "an object": b"{}",
                          "an empty list": b"[]", "a list of numbers": b"[1, 2]",
                          "a wrong result": b'[{"method": "x"}]'}.items():  # fmt: skip
        add("run folder", f"report {name}", ["report", "{tmp}/results.json", "--output", "{tmp}/r"],
            r"error: results file (is not valid JSON|holds no evaluation results)",
            setup=results_file(content))  # fmt: skip
    add(
        "run folder",
        "report a missing file",
        ["report", "{tmp}/none.json", "--output", "{tmp}/r"],
        r"error: no such file or directory, '.*none.json'; check the path",
    )
    add(
        "run folder",
        "report a folder",
        ["report", "{tmp}", "--output", "{tmp}/r"],
        r"error: is a folder, not a file, '.*'; give a file$",
    )

    def a_file(run: Path, tmp: Path) -> None:
        (tmp / "a-file").write_text("not a folder")

    add("run folder", "train into a file", ["train", "--run-dir", "{tmp}/a-file", *TINY],
        r"error: is a file, not a folder, '.*a-file'; give a folder", setup=a_file)  # fmt: skip
    add("run folder", "report into a file", ["report", "{run}/evaluation.json", "--output",
        "{tmp}/a-file"], r"error: is a file, not a folder, '.*a-file'; give a folder",
        setup=a_file)  # fmt: skip
    add("run folder", "report at a radius not evaluated", ["report", "{run}/evaluation.json",
        "--output", "{tmp}/r", "--epsilon", "7"], r"error: --epsilon 7 is not a radius of the "
        r"results in '.*evaluation.json' \(evaluated: 2\); pass --epsilon one of those$")  # fmt: skip
    add("run folder", "report the same results twice", ["report", "{run}/evaluation.json",
        "{run}/evaluation.json", "--output", "{tmp}/r"], r"error: these results do not make one table")  # fmt: skip

    def quickstart_done(run: Path, tmp: Path) -> None:
        (tmp / "quick").mkdir()
        (tmp / "quick" / "evaluation.json").write_text("[]\n")

    quick = [
        "quickstart",
        "--output",
        "{tmp}/quick",
        "--iterations",
        "1",
        "--tasks",
        "1",
        "--quiet",
    ]
    add("run folder", "quickstart over results", quick, r"error: results already exist, '.*evaluation.json'",
        setup=quickstart_done)  # fmt: skip
    add(
        "run folder",
        "quickstart with a bad override",
        [*quick, "-o", "train.meta_lr=.nan"],
        CONFIG_ERROR,
    )
    add(
        "run folder",
        "quickstart with 0 iterations",
        [*quick[:3], "--iterations", "0"],
        CONFIG_ERROR,
    )
    if not CUDA:
        add(
            "run folder",
            "quickstart on cuda",
            [*quick, "-o", "device=cuda"],
            r"error: device 'cuda'",
        )

    # -- one writer at a time ------------------------------------------------------------
    for name, argv, message in (
        ("train --resume", train_cmd("--resume", "-o", "train.iterations=3"), "is in use by process 4242"),
        ("train --overwrite", overwrite(), "is in use by process 4242"),
        ("evaluate", ["evaluate", "{run}", "--overwrite", "--quiet"], "is being written by process 4242"),
        ("report", ["report", "{run}/evaluation.json", "--output", "{tmp}/r"], "is being written by process 4242"),
    ):  # fmt: skip
        add("lock", f"{name} while another process trains", argv,
            rf"error: run folder '.*' {message} \(l2l-adversarial train\); wait", setup=HOLD_LOCK)  # fmt: skip

    # -- diverging training: stopped before a checkpoint, old results kept ---------------
    rare = ["-o", "train.checkpoint_every=100"]  # the only checkpoint: the last iteration's
    add(
        "divergence",
        "overwrite with a huge learning rate",
        overwrite("-o", "train.meta_lr=1e9", *rare),
        r"error: training diverged, .* at iteration 2 .*; lower train.meta_lr \(now 1e\+09\)",
    )
    add(
        "divergence",
        "overwrite with a huge inner rate",
        overwrite("-o", "train.inner_lr=1e30"),
        r"error: training diverged, .* at iteration 1 ",
    )
    for method in ("adml", "aq", "maml-ad", "maml"):
        for lr in ("1e3", "1e20"):
            add("divergence", f"{method} with inner rate {lr}",
                overwrite("-o", f"method={method}", "-o", f"train.inner_lr={lr}",
                          "-o", "train.adaptation_steps=2"),
                r"error: training diverged, the meta-loss .* at iteration 1 .*no checkpoint was written")  # fmt: skip
    add(
        "divergence",
        "overwrite with a tiny loss limit",
        overwrite("-o", "train.max_loss=1e-6"),
        r"error: training diverged, the meta-loss .* exceeds train.max_loss=1e-06 at iteration 1",
    )
    keep_checkpoint = lambda run: ["checkpoint.pt", "summary.json", "evaluation.json"]  # noqa: E731
    add("divergence", "resume with a huge learning rate",
        train_cmd("--resume", "-o", "train.iterations=4", "-o", "train.meta_lr=1e9", *rare,
                  "--accept-changes", "train.meta_lr"),
        r"error: training diverged, .* at iteration 4 .*the checkpoint of iteration 2 is kept",
        keep=keep_checkpoint)  # fmt: skip

    # -- a full disk -------------------------------------------------------------------------
    add("disk", "train --resume", train_cmd("--resume", "-o", "train.iterations=4"),
        r"error: no space left on device, '.*(checkpoint.pt|validation.csv)'; free space", setup=FULL_DISK,
        keep=keep_checkpoint)  # fmt: skip
    add(
        "disk",
        "train --overwrite",
        overwrite(),
        r"error: no space left on device, '.*'; free space",
        setup=FULL_DISK,
    )
    add(
        "disk",
        "evaluate --overwrite",
        ["evaluate", "{run}", "--overwrite", "--quiet"],
        r"error: no space left on device, '.*evaluation.json'; free space",
        setup=FULL_DISK,
    )
    add(
        "disk",
        "report",
        ["report", "{run}/evaluation.json", "--output", "{tmp}/r"],
        r"error: no space left on device, '.*'; free space",
        setup=FULL_DISK,
    )
    return found


def HOLD_LOCK(run: Path, tmp: Path) -> None:  # noqa: N802 (a constant-like setup)
    """Another process's writer lock, as ``l2l-adversarial train`` takes it."""
    handle = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(handle, b"4242 l2l-adversarial train\n")
    HELD.append(handle)


HELD: list[int] = []


def FULL_DISK(run: Path, tmp: Path) -> None:  # noqa: N802
    """Every fsync fails with ENOSPC (as writing to a full disk does)."""

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    PATCHES.setattr(os, "fsync", full)


PATCHES = pytest.MonkeyPatch()
CASES = cases()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished, evaluated run folder (copied for every case)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(filled(train_cmd(), run)) == 0
    assert main(["evaluate", str(run), *TINY]) == 0
    return run


def filled(argv: list[str], run: Path, tmp: Path | None = None) -> list[str]:
    """``argv`` with ``{run}`` and ``{tmp}`` replaced."""
    tmp = tmp or run.parent
    return [a.replace("{run}", str(run)).replace("{tmp}", str(tmp)) for a in argv]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != ".lock"
    }


def run_case(case: Case, trained: Path, tmp: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run one case; return its outcome and what was printed."""
    run = tmp / "run"
    shutil.copytree(trained, run)
    if case.setup is not None:
        case.setup(run, tmp)
    before = snapshot(tmp)
    argv = filled(case.argv, run, tmp)
    capsys.readouterr()
    try:
        code = main(argv)
    except BaseException as error:  # noqa: BLE001 (the campaign classifies everything)
        return f"traceback: {type(error).__name__}: {error}"
    finally:
        PATCHES.undo()
        while HELD:
            os.close(HELD.pop())
    printed = capsys.readouterr()
    message = printed.err.strip() if case.code else printed.out.strip()
    first = message.splitlines()[0] if message else ""
    after = snapshot(tmp)
    kept = case.keep(run) if case.keep else None
    changed = sorted(
        name
        for name in before.keys() | after.keys()
        if before.get(name) != after.get(name)
        and (kept is None or Path(name).name in kept and name.startswith("run/"))
    )
    if "internal error" in printed.err:
        return f"traceback: {printed.err[-600:]}"
    if case.code and code == 0:
        return f"accepted: {first}"
    if changed:
        return f"lost: {changed} ({first})"
    if case.code and len(message.splitlines()) != 1:
        return f"unclear: {len(message.splitlines())} lines, {message!r}"
    if code != case.code or not re.match(case.first_line, first):
        return f"unclear: exit {code}, {first!r}"
    missing = [text for text in case.mentions if text not in message]
    if missing:
        return f"unclear: {missing} not in {message!r}"
    return "handled"


@pytest.mark.parametrize("case", CASES, ids=[f"{c.family}: {c.name}" for c in CASES])
def test_bad_input_is_refused_and_changes_nothing(
    case: Case, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome = run_case(case, trained, tmp_path, capsys)
    assert outcome == "handled", outcome
    assert not (tmp_path / "executed").exists()  # the malicious pickle never ran


def test_the_campaign_covers_every_family() -> None:
    families = {case.family for case in CASES}
    assert len(CASES) >= 150 and len({(c.family, c.name) for c in CASES}) == len(CASES)
    assert families >= {"config", "config file", "data", "resume", "checkpoint", "run folder",
                        "lock", "divergence", "disk"}  # fmt: skip


# -- behaviour behind the campaign ------------------------------------------------------------
ROOT = Path(__file__).parents[1]


def checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


def test_resume_accepting_a_new_learning_rate_uses_it_and_config_records_it(
    trained: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    accept = ["--resume", "-o", "train.iterations=3", "-o", "train.meta_lr=0.01"]
    assert main(filled(train_cmd(*accept, "--accept-changes", "train.meta_lr"), run)) == 0
    state = checkpoint(run)
    assert state["iteration"] == 3 and state["config"]["train"]["meta_lr"] == 0.01
    assert state["optimizers"][0]["param_groups"][0]["lr"] == 0.01  # not the saved 0.001
    text = (run / "config.yaml").read_text()
    assert text.startswith("# resumed at iteration 2 accepting train.meta_lr: 0.001 -> 0.01\n")
    assert (
        main(["evaluate", str(run), "--overwrite", "--quiet"]) == 0
    )  # config and checkpoint agree


def test_evaluation_records_the_checkpoint_and_says_when_a_run_is_unfinished(
    trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    finished = json.loads((run / "evaluation.json").read_text())[0]["checkpoint"]
    assert finished == {"iteration": 2, "digest": checkpoint(run)["digest"], "finished": True}
    config = (run / "config.yaml").read_text().replace("iterations: 2", "iterations: 5")
    (run / "config.yaml").write_text(config)  # as if killed at iteration 2 of 5
    assert main(["evaluate", str(run), "--overwrite", "--quiet"]) == 0
    assert capsys.readouterr().err.startswith(
        f"warning: '{run}' is unfinished (checkpoint of iteration 2 of 5)"
    )
    recorded = json.loads((run / "evaluation.json").read_text())[0]["checkpoint"]
    assert recorded == {**finished, "finished": False}


def test_overwrite_keeps_the_old_results_until_the_new_run_checkpoints(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    old = (run / "checkpoint.pt").read_bytes()
    from l2l_adversarial.app import training

    seen: list[list[str]] = []
    original = training.Trainer.step

    def step(self: training.Trainer) -> tuple[float, float]:
        seen.append(sorted(p.name for p in run.iterdir()))
        return original(self)

    monkeypatch.setattr(training.Trainer, "step", step)
    assert main(filled(overwrite("-o", "seed=4"), run)) == 0
    aside = [name for name in seen[0] if name.startswith(".replaced-")]
    assert aside and "checkpoint.pt" not in seen[0]  # moved aside while the new run starts
    assert not any(name.startswith(".replaced-") for name in seen[1])  # dropped at its checkpoint
    assert (run / "checkpoint.pt").read_bytes() != old
    assert not (run / "evaluation.json").exists()  # the old run's evaluation went with it
    names = {p.name for p in run.iterdir()}
    assert names >= {".lock", "checkpoint.pt", "config.yaml", "metrics.csv", "summary.json"}
    assert not any(name.startswith(".replaced-") for name in names)


def test_a_run_killed_before_its_first_checkpoint_starts_again_without_overwrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from l2l_adversarial.app import training

    run = tmp_path / "run"
    original = training.Trainer.save

    def killed(self: training.Trainer) -> None:
        raise SystemExit(137)  # the process dies where the first checkpoint would be written

    monkeypatch.setattr(training.Trainer, "save", killed)
    argv = ["train", "--run-dir", str(run), *TINY, "-o", "train.log_every=1"]
    with pytest.raises(SystemExit):
        main(argv)
    assert sorted(p.name for p in run.iterdir()) == [".lock", "config.yaml", "metrics.csv"]
    monkeypatch.setattr(training.Trainer, "save", original)
    assert main([*argv[:1], "--resume", *argv[1:]]) == 2  # nothing to resume: says so
    assert main(argv) == 0  # and a plain run starts it again
    rows = (run / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows] == ["iteration", "1", "2"]


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_results_follow_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        run = tmp_path / "run"
        assert main(["train", "--run-dir", str(run), *TINY]) == 0
        assert main(["evaluate", str(run), *TINY]) == 0
    finally:
        os.umask(previous)
    for name in ("checkpoint.pt", "config.yaml", "metrics.csv", "summary.json", "evaluation.json"):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_start_up_ends_with_one_line_and_changes_nothing(
    trained: Path,
    tmp_path: Path,
    signum: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from l2l_adversarial.app import runs

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = snapshot(tmp_path)

    def loading(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signum)  # arrives while the data is being loaded
        time.sleep(5)

    monkeypatch.setattr(runs, "task_source", loading)
    assert main(filled(overwrite(), run)) == 128 + signum
    name = signal.Signals(signum).name
    assert (
        capsys.readouterr().err
        == f"interrupted ({name}) before train wrote its results; run it again\n"
    )
    assert snapshot(tmp_path) == before


def wait_for(condition: Callable[[], bool], seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_sigterm_and_sigusr1_save_a_checkpoint_and_resume_identically(
    tmp_path: Path, signum: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real process: a second writer is refused naming its pid, readers wait; then the
    signal stops it with a checkpoint, and resuming ends bit-identical to a run that never
    stopped."""
    run = tmp_path / "run"
    long = [
        "-o",
        "train.iterations=100000",
        "-o",
        "train.checkpoint_every=100000",
        "-o",
        "train.log_every=1",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "l2l_adversarial", "train", "--run-dir", str(run), *TINY, *long],
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},  # as conftest.py
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = run / "metrics.csv"
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) > 3)
        assert main(["train", "--run-dir", str(run), *TINY, "--overwrite"]) == 2
        assert capsys.readouterr().err.startswith(
            f"error: run folder '{run}' is in use by process {process.pid} (l2l-adversarial train)"
        )
        assert main(["evaluate", str(run), "--quiet", "--output", str(tmp_path / "e.json")]) == 2
        assert f"is being written by process {process.pid}" in capsys.readouterr().err
        process.send_signal(signum)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signum
    stopped = checkpoint(run)["iteration"]
    name = signal.Signals(signum).name
    assert err.strip().splitlines()[-1] == (
        f"interrupted ({name}) after iteration {stopped}, checkpoint saved in "
        f"'{run / 'checkpoint.pt'}'; continue with --resume"
    )
    total = ["-o", f"train.iterations={stopped + 2}"]
    assert (
        main(["train", "--run-dir", str(run), *TINY, *total, "-o", "train.log_every=1", "--resume"])
        == 0
    )
    reference = tmp_path / "reference"
    assert main(["train", "--run-dir", str(reference), *TINY, *total]) == 0
    resumed, uninterrupted = checkpoint(run), checkpoint(reference)
    for key, value in uninterrupted["learner"].items():
        assert torch.equal(resumed["learner"][key], value), key
    assert resumed["iteration"] == uninterrupted["iteration"] == stopped + 2
    assert (run / "metrics.csv").read_text().count("\n") == stopped + 3  # header, no duplicates
