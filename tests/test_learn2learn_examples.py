"""The README's API swap applied to learn2learn 0.2.0's own example files, and run.

The example files come from learn2learn's PyPI source distribution at test time (never copied
into this repository): ``.cache/sdists/learn2learn-0.2.0.tar.gz`` when it is there (or the
folder in ``L2LA_SDIST_DIR``), else ``pip download`` fetches it into that folder. The diffs
are read from README.md and docs/ as they stand, applied with ``patch -p1``, and the patched
scripts run in a subprocess for one meta-iteration (MiniImageNet, on generated cache files
under a temporary ``$HOME``) or a few (sine regression).
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
from data_factories import write_cifar100, write_metaoptnet_cifar, write_mini_imagenet_cache

REPO = Path(__file__).resolve().parents[1]
SDIST = "learn2learn-0.2.0.tar.gz"
MINI_IMAGENET_EXAMPLE = "examples/vision/maml_miniimagenet.py"
SINE_EXAMPLE = "examples/maml_sine.py"
SINE_DIFF = REPO / "docs" / "maml_sine_adml.diff"
ANIL_EXAMPLE = "examples/vision/anil_fc100.py"
ANIL_DIFF = REPO / "docs" / "anil_fc100_adml.diff"


def sdist_folder() -> Path:
    return Path(os.environ.get("L2LA_SDIST_DIR", REPO / ".cache" / "sdists"))


def learn2learn_sdist() -> Path:
    """learn2learn 0.2.0's sdist, downloaded with pip into the cache folder if missing."""
    folder = sdist_folder()
    path = folder / SDIST
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-build-isolation"]
            + ["--no-binary", "learn2learn", "learn2learn==0.2.0", "-d", str(folder)],
            check=True,
        )
    return path


def extract_example(tmp_path: Path, member: str) -> Path:
    """``member`` of the sdist under ``tmp_path/learn2learn-0.2.0`` (the diff's ``-p1`` root)."""
    with tarfile.open(learn2learn_sdist()) as archive:
        archive.extract(f"learn2learn-0.2.0/{member}", tmp_path, filter="data")
    return tmp_path / "learn2learn-0.2.0"


def readme_diff(target: str) -> str:
    """The README's ```diff block that patches ``target``."""
    blocks = re.findall(r"^```diff\n(.*?)^```$", (REPO / "README.md").read_text(), re.M | re.S)
    matching = [block for block in blocks if f"--- a/{target}\n" in block]
    assert len(matching) == 1, f"README.md must hold one diff block for {target}"
    return matching[0]


def apply(diff: str, root: Path) -> None:
    result = subprocess.run(
        ["patch", "-p1", "--forward", "--no-backup-if-mismatch"],
        input=diff,
        text=True,
        cwd=root,
        capture_output=True,
    )
    assert result.returncode == 0, f"patch rejected the diff:\n{result.stdout}{result.stderr}"
    assert not list(root.rglob("*.rej")) and not list(root.rglob("*.orig"))


def run_python(code: str, cwd: Path, home: Path) -> str:
    env = {
        **os.environ,
        "HOME": str(home),
        "PYTHONPATH": str(REPO),
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"patched example failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


# Counts the learner calls and optimizer steps of a run, so that a test knows what trained.
COUNTING = """
    import collections, json, torch, l2l_adversarial as l2la
    calls = collections.Counter()
    def counted(owner, name):
        original = getattr(owner, name)
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        setattr(owner, name, wrapper)
    counted(l2la.ADML, "meta_loss")
    counted(l2la.ADML, "loss_and_accuracy")
    counted(l2la.ADML, "clone")
    counted(torch.optim.Adam, "step")
"""


def called(output: str) -> collections.Counter[str]:
    return collections.Counter(json.loads(re.search(r"^calls (.*)$", output, re.M).group(1)))


def run_vision_example(root: Path, home: Path, call: str) -> collections.Counter[str]:
    """Run ``call`` (``module.main(...)`` of ``examples/vision``) with the name-only-swap
    warning as an error; check the metrics it prints are numbers, return its calls."""
    module = call.split(".")[0]
    output = run_python(
        COUNTING
        + f"""
    import sys, warnings
    sys.path.insert(0, "examples/vision")
    import {module}
    with warnings.catch_warnings():
        warnings.simplefilter("error", l2la.algorithms.base.NameOnlySwapWarning)
        {call}
    print("calls", json.dumps(calls))
    """,
        cwd=root,
        home=home,
    )
    for metric in ("Meta Train Error", "Meta Valid Accuracy", "Meta Test Accuracy"):
        value = float(re.search(rf"^{metric} (\S+)$", output, re.M).group(1))
        assert value == value and value >= 0  # a finite, non-NaN number
    return called(output)


def test_readme_swap_applies_to_and_runs_learn2learns_miniimagenet_example(tmp_path):
    root = extract_example(tmp_path, MINI_IMAGENET_EXAMPLE)
    apply(readme_diff(MINI_IMAGENET_EXAMPLE), root)
    home = tmp_path / "home"
    for mode in ("train", "validation", "test"):  # the example reads root='~/data'
        write_mini_imagenet_cache(home / "data", mode, num_classes=5, images_per_class=2)
    calls = run_vision_example(
        root,
        home,
        "maml_miniimagenet.main(ways=5, shots=1, meta_batch_size=2, adaptation_steps=1, "
        "num_iterations=1, cuda=False)",
    )
    # ADML's objective once per training task, clone() once per validation and test task
    # (without a name-only-swap warning: it is an error here), one optimizer step.
    assert (calls["loss_and_accuracy"], calls["clone"], calls["step"]) == (2, 4, 1)


def test_anil_diff_applies_to_and_runs_learn2learns_anil_fc100_example(tmp_path):
    root = extract_example(tmp_path, ANIL_EXAMPLE)
    apply(ANIL_DIFF.read_text(), root)
    home = tmp_path / "home"  # the example reads FC100_{train,val,test}.pickle from ~/data
    files = write_cifar100(tmp_path / "cifar", train_per_class=2, test_per_class=2)
    write_metaoptnet_cifar(home / "data", files, "fc100")
    calls = run_vision_example(
        root, home, "anil_fc100.main(ways=5, shots=1, adapt_steps=1, meta_bsz=2, iters=1, cuda=0)"
    )
    # ADML's objective once per training task (features and head both step: the example's
    # gradient averaging reads every parameter's .grad), clone() once per validation and test
    # task, without a name-only-swap warning, one optimizer step.
    assert (calls["loss_and_accuracy"], calls["clone"], calls["step"]) == (2, 4, 1)


def test_sine_diff_applies_to_and_meta_trains_learn2learns_sine_example(tmp_path):
    if importlib.util.find_spec("torchmeta") is None:
        pytest.skip("torchmeta is not installed: bash scripts/install_torchmeta.sh")
    root = extract_example(tmp_path, SINE_EXAMPLE)
    apply(SINE_DIFF.read_text(), root)
    output = run_python(
        COUNTING
        + """
    import sys
    sys.path.insert(0, "examples")
    import maml_sine
    maml_sine.main(shots=5, tasks_per_batch=2, num_tasks=6, adapt_steps=2, hidden_dim=8)
    print("calls", json.dumps(calls))
    """,
        cwd=root,
        home=tmp_path,
    )
    calls = called(output)
    assert (calls["meta_loss"], calls["clone"], calls["step"]) == (6, 0, 3)  # 3 x 2 tasks
    loss = float(re.search(r"^Iteration: 0 Meta Train Loss (\S+)$", output, re.M).group(1))
    assert 0 < loss < float("inf")


def test_patch_tool_is_available():
    assert shutil.which("patch"), "the example tests need GNU patch (apt-get install patch)"
