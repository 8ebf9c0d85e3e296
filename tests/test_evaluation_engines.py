"""Batched meta-testing (``evaluate(engine="vmap")``) against the sequential evaluator, the
reference: the same seeded tasks must give the same accuracies, task by task."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from benchmarks.op_counter import OpCounter
from l2l_adversarial import CNN4, FFGSM, FGSM, MLP, PGD, MatchingNetwork, Task
from l2l_adversarial.data import FewShotTasks
from l2l_adversarial.evaluation import (
    EvaluationResult,
    GradientLearner,
    evaluate,
    few_shot_learner,
)

WAYS, QUERIES = 3, 2


def make_tasks(count: int, shots: int, shape: tuple[int, ...], seed: int = 0) -> list[Task]:
    generator = torch.Generator().manual_seed(seed)
    support_y, query_y = torch.arange(WAYS).repeat(shots), torch.arange(WAYS).repeat(QUERIES)
    return [
        Task(
            torch.rand(len(support_y), *shape, generator=generator, dtype=torch.float64),
            support_y,
            torch.rand(len(query_y), *shape, generator=generator, dtype=torch.float64),
            query_y,
        )
        for _ in range(count)
    ]


def models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    cnn = CNN4(ways=WAYS, in_channels=1, hidden=3, image_size=16).double()
    mlp = MLP(in_features=6, ways=WAYS, hidden=(8,)).double()
    return {"cnn4": (cnn, (1, 16, 16)), "mlp": (mlp, (6,))}


def run(model: nn.Module, tasks: list[Task], engine: str, **kwargs) -> EvaluationResult:
    kwargs.setdefault("epsilons", (8.0,))
    learner = GradientLearner(model, lr=0.4, steps=kwargs.pop("steps", 2))
    return evaluate(learner, tasks, method="MAML", engine=engine, **kwargs)


def assert_same_results(batched: EvaluationResult, sequential: EvaluationResult) -> None:
    assert [s.scenario for s in batched.scenarios] == [s.scenario for s in sequential.scenarios]
    for ours, reference in zip(batched.scenarios, sequential.scenarios, strict=True):
        assert ours.task_accuracies == reference.task_accuracies, ours.scenario
        assert ours.accuracy_curve == pytest.approx(reference.accuracy_curve, abs=1e-9)
        assert ours.loss_curve == pytest.approx(reference.loss_curve, rel=1e-9)
    assert batched.attacks == sequential.attacks


@pytest.mark.parametrize("name", ["cnn4", "mlp"])
@pytest.mark.parametrize("protocol", ["paper", "adapted"])
def test_vmap_engine_equals_the_sequential_evaluator(name: str, protocol: str) -> None:
    """Both protocols, 1 and 2 shots (the 40% rows), a chunk that does not divide the tasks;
    the accuracies differ between scenarios, so equal tables are not a coincidence."""
    model, shape = models()[name]
    for shots in (1, 2):
        tasks = make_tasks(5, shots, shape, seed=shots)
        sequential = run(model, tasks, "sequential", protocol=protocol)
        batched = run(model, tasks, "vmap", protocol=protocol, chunk_size=2)
        assert_same_results(batched, sequential)
        assert len({s.accuracy for s in sequential.scenarios}) > 1


@pytest.mark.parametrize(
    "make_attack",
    [
        functools.partial(PGD, steps=3),  # random start, seeded per task
        FFGSM,
        functools.partial(PGD, steps=2, random_start=False),
    ],
    ids=["pgd", "ffgsm", "pgd-no-start"],
)
def test_vmap_engine_keeps_each_tasks_seeded_random_start(make_attack) -> None:
    model, shape = models()["cnn4"]
    tasks = make_tasks(4, 2, shape)
    options = {"make_attack": make_attack, "seed": 7, "protocol": "adapted"}
    sequential = run(model, tasks, "sequential", **options)
    assert_same_results(run(model, tasks, "vmap", chunk_size=3, **options), sequential)
    other_seed = run(model, tasks, "sequential", **{**options, "seed": 8})
    if make_attack is FFGSM or getattr(make_attack, "keywords", {}).get("random_start", True):
        assert other_seed.to_dict() != sequential.to_dict()  # the seed reaches the starts


class SignFlippedFGSM(FGSM):
    """An attack the vmap engine does not batch: it runs it task by task."""

    def perturb_pixels(self, forward, pixels, labels):
        return (pixels - self.eps * self.input_gradient(forward, pixels, labels).sign()).clamp(
            *self.data_range
        )


def test_vmap_engine_runs_other_attacks_task_by_task() -> None:
    model, shape = models()["mlp"]
    tasks = make_tasks(3, 2, shape)
    sequential = run(model, tasks, "sequential", make_attack=SignFlippedFGSM)
    assert_same_results(run(model, tasks, "vmap", make_attack=SignFlippedFGSM), sequential)
    assert sequential.to_dict() != run(model, tasks, "sequential").to_dict()


def test_chunk_size_and_zero_steps_change_nothing() -> None:
    model, shape = models()["mlp"]
    tasks = make_tasks(5, 1, shape)
    for steps in (0, 2):
        reference = run(model, tasks, "sequential", chunk_size=1, steps=steps)
        for engine, chunk in (("sequential", 3), ("vmap", 1), ("vmap", 5)):
            assert_same_results(run(model, tasks, engine, chunk_size=chunk, steps=steps), reference)


def test_evaluation_syncs_at_most_once_per_task() -> None:
    """Issue 11: at most one host read per evaluation task, on either engine: one of the
    first task's labels (its shape), then per chunk one value check and one copy of the
    results to the host; the sequential evaluator used to read every loss and accuracy."""
    model, shape = models()["cnn4"]
    tasks = make_tasks(8, 2, shape)
    for engine in ("sequential", "vmap"):
        with OpCounter() as counter:
            run(model, tasks, engine, chunk_size=4, epsilons=(2.0, 8.0))
        assert counter.syncs == 1 + 2 * 2 <= len(tasks), (engine, counter.sync_names)


def test_vmap_evaluator_launches_a_chunks_kernels_once() -> None:
    """Kernel launches (ATen ops that are not views: exact, machine-independent counts) per
    evaluation task fall with the chunk size on the vmap engine, not on the sequential one.
    The meta-testing counts of docs/performance.md: ``pytest tests/test_evaluation_engines.py -k launches
    -s`` (issue 11's 5-way 1-shot, 15 queries; one eps, 10 steps, CNN4)."""
    torch.manual_seed(0)
    model = CNN4(ways=5, in_channels=1, hidden=4, image_size=16)
    support_y, query_y = torch.arange(5), torch.arange(5).repeat_interleave(15)
    generator = torch.Generator().manual_seed(0)
    tasks = [
        Task(torch.rand(5, 1, 16, 16, generator=generator), support_y,
             torch.rand(75, 1, 16, 16, generator=generator), query_y)
        for _ in range(16)
    ]  # fmt: skip
    learner = GradientLearner(model, lr=0.01, steps=10)
    launches = {}
    for engine in ("sequential", "vmap"):
        for chunk in (4, 16):
            with OpCounter() as counter:
                evaluate(learner, tasks, method="MAML", epsilons=(2.0,), engine=engine,
                         chunk_size=chunk)  # fmt: skip
            launches[engine, chunk] = counter.launches / len(tasks)
            print(f"{engine}, chunk {chunk}: {counter.launches / len(tasks):.1f} launches and "
                  f"{counter.ops / len(tasks):.1f} ATen ops per task, {counter.syncs} syncs "
                  f"for {len(tasks)} tasks")  # fmt: skip
            assert counter.syncs == 1 + 2 * len(tasks) // chunk, counter.sync_names
    assert launches["vmap", 16] < 0.2 * launches["sequential", 16]
    assert launches["vmap", 16] < 0.5 * launches["vmap", 4]
    assert launches["sequential", 16] > 0.95 * launches["sequential", 4]


def test_vmap_engine_refuses_what_it_cannot_batch() -> None:
    tasks = make_tasks(2, 1, (1, 16, 16))
    network = few_shot_learner(
        MatchingNetwork(ways=WAYS, in_channels=1, hidden=3, image_size=16, fce=False).double(),
        0.1,
        1,
    )
    with pytest.raises(ValueError, match="engine='vmap' runs gradient-based learners"):
        evaluate(network, tasks, method="Matching Nets", engine="vmap")
    dropout = nn.Sequential(nn.Flatten(), nn.Linear(256, WAYS), nn.Dropout(0.5)).double()
    with pytest.raises(ValueError, match="Dropout"):
        run(dropout, tasks, "vmap")
    with pytest.raises(ValueError, match="engine must be one of"):
        run(dropout, tasks, "fast")
    with pytest.raises(ValueError, match="chunk_size"):
        run(dropout, tasks, "sequential", chunk_size=0)
    model, shape = models()["mlp"]
    uneven = make_tasks(2, 1, shape)
    uneven[1] = Task(uneven[1][0], uneven[1][1], uneven[1][2][:-1], uneven[1][3][:-1])
    with pytest.raises(ValueError, match=r"stacks the tasks.*but tasks\[1\]"):
        run(model, uneven, "vmap")
    run(model, uneven, "sequential")  # task by task, other query sizes are fine


@pytest.mark.parametrize("engine", ["sequential", "vmap"])
def test_a_bad_task_in_a_chunk_is_named(engine: str) -> None:
    model, shape = models()["mlp"]
    tasks = make_tasks(6, 2, shape)
    poisoned = tasks[4].support_inputs.clone()
    poisoned[0, 0] = float("nan")
    tasks[4] = Task(poisoned, *tasks[4][1:])
    with pytest.raises(ValueError, match=r"tasks\[4\]: .*non-finite"):
        run(model, tasks, engine, chunk_size=3)
    unbalanced = make_tasks(3, 2, shape)
    labels = unbalanced[2].support_labels.clone()
    labels[0] = 1
    unbalanced[2] = Task(unbalanced[2][0], labels, *unbalanced[2][2:])
    with pytest.raises(ValueError, match=r"tasks\[2\]: 1, 3, 2 support samples per class"):
        run(model, unbalanced, engine)


def test_prefetched_tasks_give_the_tables_of_a_list() -> None:
    """A thread-safe task source is built a chunk ahead: same tasks, same results."""
    images = torch.rand(60, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    source = FewShotTasks((images, torch.arange(60) % 6), WAYS, 1, QUERIES, seed=3, num_tasks=7)
    assert source.thread_safe
    model, _ = models()["mlp"]
    listed = [source[i] for i in range(len(source))]
    for engine in ("sequential", "vmap"):
        assert (
            run(model, source, engine, chunk_size=2).to_dict()
            == run(model, listed, engine, chunk_size=2).to_dict()
        )
