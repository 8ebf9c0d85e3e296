"""Launch and sync budget of one training meta-iteration, counted exactly (the counts do not
depend on image size or machine speed, so tiny images give the paper size's counts).

The configuration of issue 11: 5-way 1-shot, 15 queries per class, 5 inner steps, meta-batch
4, CNN4, second order, Adam. The reference is learn2learn's MAML loop (``benchmarks/``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.conftest import REFERENCE, Size, Workload
from benchmarks.op_counter import OpCounter
from benchmarks.test_meta_iteration import METHODS
from l2l_adversarial.app.config import load_config
from l2l_adversarial.app.factory import build_learner
from l2l_adversarial.app.training import Trainer
from l2l_adversarial.data import Digits, FewShotTasks

SIZE = Size("counts", ways=5, shots=1, queries=15, channels=1, image=16, hidden=2, steps=5,
            meta_batch=4)  # fmt: skip


def counted(name: str, workload: Workload) -> OpCounter:
    iteration = METHODS[name](workload)
    iteration()  # Adam creates its state on the first step
    with OpCounter() as counter:
        iteration()
    return counter


@pytest.fixture(scope="module")
def counts() -> dict[str, OpCounter]:
    workload = Workload(SIZE, torch.device("cpu"))
    names = [REFERENCE, *(f"{m} (meta_step, vmap)" for m in ("maml", "adml", "maml-ad", "aq"))]
    return {name: counted(name, workload) for name in names}


@pytest.mark.parametrize(
    ("method", "budget"), [("adml", 0.5), ("maml", 0.3), ("maml-ad", 0.3), ("aq", 0.3)]
)
def test_batched_meta_iteration_within_its_launch_budget(
    counts: dict[str, OpCounter], method: str, budget: float
) -> None:
    """Batched ADML <= 0.5x learn2learn's ATen ops (views included) and kernel launches (ATen
    ops that are not views); MAML, MAML-AD, AQ <= 0.3x both. CNN4 runs folded
    (``l2l_adversarial.runtime.layouts``)."""
    reference, ours = counts[REFERENCE], counts[f"{method} (meta_step, vmap)"]
    assert ours.ops <= budget * reference.ops, (ours.ops, reference.ops)
    assert ours.launches <= budget * reference.launches, (ours.launches, reference.launches)
    # Adam's per-parameter step counters (CPU scalars: no device wait on CUDA) and the
    # meta-batch's one value check.
    assert reference.syncs == reference.sync_names["aten._local_scalar_dense"] == 18
    assert ours.syncs == reference.syncs + 1, ours.sync_names


@pytest.mark.parametrize("engine", ["sequential", "vmap"])
@pytest.mark.parametrize("method", ["maml", "adml", "maml-ad", "aq"])
@pytest.mark.parametrize("prefetch", [2, 0])
def test_a_training_iteration_syncs_no_more_than_learn2learns_loop(
    tmp_path: Path, method: str, engine: str, prefetch: int
) -> None:
    """``Trainer.step`` (what ``train`` runs): the meta-batch's value checks run where it is
    built, so the loop reads only Adam's 18 step counters. Built in place (``prefetch=0``),
    the check's one read of the host tasks (before any copy to a device) is in the loop."""
    overrides = [f"method={method}", "dataset.name=digits", "dataset.image_size=16",
                 "device=cpu", "task.ways=5", "task.shots=1", "task.query_shots=15",
                 "model.hidden=2", "train.meta_batch_size=4", "train.adaptation_steps=5",
                 f"train.engine={engine}", f"train.prefetch={prefetch}"]  # fmt: skip
    config = load_config(None, overrides)
    tasks = FewShotTasks(Digits("train", image_size=16), 5, 1, 15, seed=0)
    trainer = Trainer(config, tmp_path, tasks, build_learner(config, 1, 16), torch.device("cpu"))
    try:
        trainer.step()  # Adam creates its state on the first step
        trainer.iteration += 1
        with OpCounter() as counter:
            trainer.step()
    finally:
        trainer.close_batches()
    assert counter.sync_names["aten._local_scalar_dense"] == counter.syncs
    assert counter.syncs == (18 if prefetch else 19), counter.sync_names
