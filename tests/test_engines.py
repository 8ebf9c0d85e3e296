"""The engines against the sequential reference, for every learner.

The reference is each learner's per-task objective on one task (``task_objective`` without
ops: attack, then adapt, checked against closed forms in test_algorithms.py), averaged over
the meta-batch by hand. Every engine must give the reference's mean, meta-gradient and
training curve to floating-point tolerance, with no host-device synchronisation beyond the optimizer's own and
the meta-batch's one value check.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from data_factories import SyntheticTasks
from data_factories import digits_config as training_config
from test_training import Killed, final_parameters, stop_at
from torch import Tensor, nn

from benchmarks.op_counter import OpCounter
from l2l_adversarial import (
    ADML,
    CNN4,
    FFGSM,
    FGSM,
    MAML,
    MAMLAD,
    MLP,
    PGD,
    AdversarialQuerying,
    Task,
    engines,
)
from l2l_adversarial.algorithms import MetaLearner, SequentialOps
from l2l_adversarial.app.training import train as train_run
from l2l_adversarial.runtime import StackedOps
from l2l_adversarial.validation import value_checks

EPS = 8 / 255
WAYS = 3


class OwnForward(nn.Module):
    """A model with a forward pass of its own: the vmap engine runs it vmapped, not folded
    (``l2l_adversarial.runtime.layouts.fold_obstacle``)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "cnn4": lambda: CNN4(ways=WAYS, in_channels=1, hidden=4, image_size=16),
    "mlp": lambda: MLP(in_features=256, ways=WAYS, hidden=(8,)),
    "cnn4-vmapped": lambda: OwnForward(CNN4(ways=WAYS, in_channels=1, hidden=4, image_size=16)),
}
LEARNERS: dict[str, Callable[..., MetaLearner]] = {
    "maml": lambda model, **kw: MAML(model, lr=0.3, **kw),
    "adml": lambda model, **kw: ADML(model, lr=0.3, clean_lr=0.2, attack=FGSM(eps=EPS), **kw),
    "adml-adapted": lambda model, **kw: ADML(
        model, lr=0.3, clean_lr=0.2, attack=FGSM(eps=EPS), attack_target="adapted", **kw
    ),
    "maml-ad": lambda model, **kw: MAMLAD(model, lr=0.3, attack=FGSM(eps=EPS), **kw),
    "maml-ad-half": lambda model, **kw: MAMLAD(
        model, lr=0.3, attack=FGSM(eps=EPS), adversarial_fraction=0.5, **kw
    ),
    "aq": lambda model, **kw: AdversarialQuerying(model, lr=0.3, attack=FGSM(eps=EPS), **kw),
    "aq-initial": lambda model, **kw: AdversarialQuerying(
        model, lr=0.3, attack=FGSM(eps=EPS), attack_target="initial", **kw
    ),
}


def make_tasks(count: int = 2, seed: int = 0, shots: int = 2, queries: int = 3) -> list[Task]:
    g = torch.Generator().manual_seed(seed)
    sy, qy = torch.arange(WAYS).repeat(shots), torch.arange(WAYS).repeat(queries)
    return [
        Task(
            torch.rand(len(sy), 1, 16, 16, generator=g, dtype=torch.float64),
            sy,
            torch.rand(len(qy), 1, 16, 16, generator=g, dtype=torch.float64),
            qy,
        )  # fmt: skip
        for _ in range(count)
    ]


def make_model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]().double()


def meta_gradient(model: nn.Module, loss: Tensor) -> list[Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


def reference_loss(learner: MetaLearner, tasks: list[Task]) -> Tensor:
    """The mean of the per-task objectives, one task at a time, by hand."""
    return torch.stack([learner.task_objective(task).total for task in tasks]).mean()


def assert_gradients_close(actual: list[Tensor], expected: list[Tensor]) -> None:
    # Conv biases before BatchNorm have a zero gradient; compare on the gradient's scale.
    scale = max(float(e.abs().max()) for e in expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12 * scale)


# -- engines: meta-gradients ---------------------------------------------------------------
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("learner_name", list(LEARNERS))
@pytest.mark.parametrize("engine", ["sequential", "vmap"])
def test_engine_meta_gradient_matches_the_sequential_reference(
    engine: str, learner_name: str, model_name: str, steps: int, first_order: bool
) -> None:
    model, tasks = make_model(model_name), make_tasks(3)
    learner = LEARNERS[learner_name](model, first_order=first_order, adaptation_steps=steps)
    expected = reference_loss(learner, tasks)
    objective = engines.meta_batch_objective(learner, tasks, engine=engine, chunk_size=2)
    torch.testing.assert_close(objective.total, expected, rtol=1e-12, atol=0)
    assert_gradients_close(meta_gradient(model, objective.total), meta_gradient(model, expected))


def seeded(tasks: list[Task], generator: torch.Generator) -> Iterator[Task]:
    """Seed the attack's generator before yielding each task, as the training loop does."""
    for index, task in enumerate(tasks):
        generator.manual_seed(100 + index)
        yield task


@pytest.mark.parametrize("learner_name", ["adml", "adml-adapted", "maml-ad", "aq"])
@pytest.mark.parametrize(
    "attack_class", [lambda: PGD(eps=EPS, steps=2, generator=torch.Generator()),
                     lambda: FFGSM(eps=EPS, generator=torch.Generator())],
    ids=["pgd", "ffgsm"],
)  # fmt: skip
def test_random_start_attacks_give_the_same_meta_gradient_in_both_engines(
    learner_name: str, attack_class: Callable[[], PGD | FFGSM]
) -> None:
    """Each task's attacks draw from the generator state it had when it left the iterator."""
    attack = attack_class()
    assert attack.generator is not None and attack.draws_random and attack.batchable
    model, tasks = make_model("cnn4"), make_tasks(3)
    learner = LEARNERS[learner_name](model, adaptation_steps=2)
    learner.attack = attack  # type: ignore[union-attr]
    references = []
    for index, task in enumerate(tasks):
        attack.generator.manual_seed(100 + index)
        references.append(learner.task_objective(task).total)
    reference = torch.stack(references).mean()
    reference_gradient = meta_gradient(model, reference)
    for engine in ("sequential", "vmap"):
        ours = engines.meta_batch_objective(learner, seeded(tasks, attack.generator), engine=engine)
        torch.testing.assert_close(ours.total, reference, rtol=1e-12, atol=0)
        assert_gradients_close(meta_gradient(model, ours.total), reference_gradient)


def test_vmap_engine_differentiates_layer_norm_twice() -> None:
    """Under vmap PyTorch's fused layer norm (like batch norm, covered by CNN4 above) gives
    wrong second derivatives; the engine must not."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(256, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, WAYS)
    ).double()
    tasks = make_tasks(2)
    adml = ADML(model, lr=0.5, adaptation_steps=2, attack=FGSM(eps=EPS))
    loss = engines.meta_batch_objective(adml, tasks, engine="vmap").total
    assert_gradients_close(
        meta_gradient(model, loss), meta_gradient(model, reference_loss(adml, tasks))
    )


@pytest.mark.parametrize("kind", [ADML, MAMLAD])
def test_vmap_engine_attacks_with_any_loss(kind: type[ADML] | type[MAMLAD]) -> None:
    """The batched attack's loss: cross-entropy in one call over all sets (the tests above),
    any other loss vmapped set by set; both give the sequential engine's samples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 1)).double()
    mse = nn.functional.mse_loss
    attack = FGSM(eps=0.1, data_range=(-5.0, 5.0), loss_fn=mse)
    learner = kind(model, lr=0.3, attack=attack, loss_fn=mse, adaptation_steps=2)
    x = 10 * torch.rand(2, 12, 1, dtype=torch.float64) - 5
    tasks = [Task(xs[:4], torch.sin(xs[:4]), xs[4:], torch.sin(xs[4:])) for xs in x]
    loss = engines.meta_batch_objective(learner, tasks, engine="vmap").total
    assert_gradients_close(
        meta_gradient(model, loss), meta_gradient(model, reference_loss(learner, tasks))
    )


def test_vmap_engine_with_batchnorm_running_statistics_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3)
    ).double()
    model[1].running_mean.uniform_(-0.5, 0.5)
    model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    with pytest.warns(UserWarning, match="track running statistics"):
        adml = ADML(model, lr=0.3, adaptation_steps=2, attack=FGSM(eps=EPS))
    tasks = make_tasks(2)
    loss = engines.meta_batch_objective(adml, tasks, engine="vmap").total
    assert_gradients_close(
        meta_gradient(model, loss), meta_gradient(model, reference_loss(adml, tasks))
    )


# -- engines: training curves --------------------------------------------------------------
def train(
    learner_name: str, engine: str, clean_step: bool, iterations: int = 3
) -> tuple[list[Tensor], list[object]]:
    model = make_model("cnn4", seed=3)
    learner = LEARNERS[learner_name](model, adaptation_steps=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    clean_optimizer = torch.optim.SGD(model.parameters(), lr=0.05) if clean_step else None
    objectives = [
        engines.meta_step(
            learner, make_tasks(2, seed=it), optimizer, clean_optimizer, engine=engine
        )
        for it in range(iterations)
    ]
    return [p.detach() for p in model.parameters()], objectives


@pytest.mark.parametrize(
    ("learner_name", "clean_step"),
    [("maml", False), ("adml", False), ("adml", True), ("adml-adapted", True), ("maml-ad", False),
     ("aq", False)],
)  # fmt: skip
def test_engines_follow_the_same_training_curve(learner_name: str, clean_step: bool) -> None:
    parameters, objectives = train(learner_name, "vmap", clean_step)
    expected_parameters, expected_objectives = train(learner_name, "sequential", clean_step)
    for ours, theirs in zip(objectives, expected_objectives, strict=True):
        assert type(ours) is type(theirs)
        for value, expected in zip(ours, theirs, strict=True):  # type: ignore[call-overload]
            assert not value.requires_grad
            torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12)
    # Adam turns the rounding noise of conv biases before BatchNorm (zero gradient) into
    # steps of ~1e-9; the other parameters move by ~1e-2.
    for p, e in zip(parameters, expected_parameters, strict=True):
        torch.testing.assert_close(p, e, rtol=1e-8, atol=1e-8)
    initial = [p.detach() for p in make_model("cnn4", seed=3).parameters()]
    assert any(not torch.allclose(p, q) for p, q in zip(parameters, initial, strict=True))


# -- host-device synchronisation -------------------------------------------------------------
@pytest.mark.parametrize("learner_name", ["maml", "adml", "adml-adapted", "maml-ad", "aq"])
@pytest.mark.parametrize("engine", ["sequential", "vmap"])
def test_a_meta_iteration_reads_the_device_once(learner_name: str, engine: str) -> None:
    """One host read (the meta-batch's value check) beyond the optimizer's own; none with
    value checks off."""
    model = make_model("cnn4")
    learner = LEARNERS[learner_name](model, adaptation_steps=2)
    tasks = make_tasks(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)  # SGD reads nothing
    engines.meta_step(learner, tasks, optimizer, engine=engine)
    with OpCounter() as counted:
        engines.meta_step(learner, tasks, optimizer, engine=engine)
    assert counted.syncs == 1, counted.sync_names
    with value_checks(False), OpCounter() as unchecked:
        engines.meta_step(learner, tasks, optimizer, engine=engine)
    assert unchecked.syncs == 0, unchecked.sync_names


# -- choosing an engine --------------------------------------------------------------------
def test_auto_is_the_sequential_engine_and_vmap_needs_equal_shapes() -> None:
    model, tasks = make_model("cnn4"), make_tasks(2)
    adml = ADML(model, lr=0.3, attack=FGSM(eps=EPS))
    assert engines.resolve_engine(adml) == "sequential"
    assert engines.resolve_engine(adml, "vmap") == "vmap"
    uneven = [tasks[0], make_tasks(1, shots=1)[0]]
    loss = engines.meta_batch_objective(adml, uneven).total
    torch.testing.assert_close(loss, reference_loss(adml, uneven), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="shapes must be equal"):
        engines.meta_batch_objective(adml, uneven, engine="vmap")


def test_vmap_obstacles_are_named() -> None:
    assert engines.vmap_obstacle(CNN4(ways=3)) is None and engines.vmap_obstacle(MLP(4, 3)) is None
    cases = {
        "track_running_stats=False": nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)),
        "random masks": nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2)),
        "second derivatives": nn.Sequential(nn.Conv1d(1, 2, 1), nn.InstanceNorm1d(2)),
    }
    for message, model in cases.items():
        reason = engines.vmap_obstacle(model)
        assert reason is not None and message in reason
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracked-BatchNorm warning
            adml = ADML(model, lr=0.1)
        assert engines.resolve_engine(adml, "auto") == "sequential"
        with pytest.raises(ValueError, match=f"engine='vmap' cannot run Sequential: .*{message}"):
            engines.resolve_engine(adml, "vmap")
    assert engines.vmap_obstacle(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2)).eval()) is None


def test_bad_engine_arguments_are_rejected_with_clear_messages() -> None:
    adml = ADML(make_model("mlp"), lr=0.1)
    optimizer = torch.optim.SGD(adml.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="engine must be one of 'auto', 'sequential', 'vmap'"):
        engines.meta_step(adml, make_tasks(1), optimizer, engine="gpu")
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        engines.meta_step(adml, make_tasks(1), optimizer, chunk_size=0)
    with pytest.raises(TypeError, match="two-step update of Algorithm 1 is ADML's"):
        engines.meta_step(MAML(make_model("mlp"), lr=0.1), make_tasks(1), optimizer, optimizer)
    for engine in engines.ENGINES:
        with pytest.raises(ValueError, match="tasks is empty"):
            engines.meta_step(adml, iter([]), optimizer, engine=engine)
    sx, sy, qx, qy = make_tasks(1)[0]
    with pytest.raises(ValueError, match=r"task 1 of the meta-batch: query_labels must lie in"):
        engines.meta_step(adml, [Task(sx, sy, qx, qy), Task(sx, sy, qx, qy + 3)], optimizer)


def test_library_inputs_are_checked_from_metadata_with_named_arguments() -> None:
    adml = ADML(make_model("cnn4"), lr=0.1)
    optimizer = torch.optim.SGD(adml.parameters(), lr=0.1)
    sx, sy, qx, qy = make_tasks(1)[0]
    # int32 labels are converted; the result equals long labels'
    converted = engines.meta_batch_objective(adml, [Task(sx, sy.int(), qx, qy.int())]).total
    torch.testing.assert_close(
        converted, engines.meta_batch_objective(adml, [Task(sx, sy, qx, qy)]).total
    )
    cases = {
        "task 0: inputs are torch.float32 but CNN4's parameters are torch.float64": Task(
            sx.float(), sy, qx.float(), qy
        ),
        r"inputs have 3 channel\(s\) .* first convolution takes 1": Task(
            sx.repeat(1, 3, 1, 1), sy, qx.repeat(1, 3, 1, 1), qy
        ),
        r"support_inputs has shape \(4, 1, 16, 16\) and support_labels shape \(5,\)": Task(
            sx[:4], sy[:5], qx, qy
        ),
        "support set is empty": Task(sx[:0], sy[:0], qx, qy),
        "support_labels must hold integer class indices": Task(sx, sy.double(), qx, qy),
    }
    for message, task in cases.items():
        with pytest.raises((TypeError, ValueError), match=message):
            engines.meta_step(adml, [task], optimizer)


def test_regression_with_mse_meta_trains_without_class_checks() -> None:
    """Any differentiable loss and float targets (the outputs' shape); accuracy is NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 32), nn.ReLU(), nn.Linear(32, 1))
    attack = FGSM(eps=0.1, data_range=(-5.0, 5.0), loss_fn=nn.functional.mse_loss)
    adml = ADML(model, lr=0.01, attack=attack, loss_fn=nn.functional.mse_loss, adaptation_steps=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)

    def sine(seed: int) -> Task:
        g = torch.Generator().manual_seed(seed)
        amplitude, phase = (
            0.1 + 4.9 * torch.rand(1, generator=g),
            torch.pi * torch.rand(1, generator=g),
        )
        x = 10 * torch.rand(20, 1, generator=g) - 5
        y = amplitude * torch.sin(x - phase)
        return Task(x[:10], y[:10], x[10:], y[10:])

    held_out = [sine(10_000 + k) for k in range(8)]

    def held_out_loss() -> float:
        return float(engines.meta_batch_objective(adml, held_out).total.detach())

    before = held_out_loss()
    for it in range(60):
        objective = engines.meta_step(adml, [sine(4 * it + k) for k in range(4)], optimizer)
    assert objective.accuracy.isnan()
    assert held_out_loss() < 0.95 * before  # 8.85 -> 8.10 in 60 iterations


# -- the engines in the training loop --------------------------------------------------------
@pytest.mark.parametrize("engine", ["sequential", "vmap"])
@pytest.mark.parametrize(
    ("method", "train_options"),
    [("adml", {"meta_update": "sequential", "attack": "ffgsm"}), ("aq", {"attack": "fgsm"})],
)
def test_train_resumes_bit_identically_with_each_engine(
    tmp_path: Path, engine: str, method: str, train_options: dict[str, object]
) -> None:
    cfg = training_config(method, engine=engine, **train_options)
    reference = final_parameters(train_run(cfg, tmp_path / "a", SyntheticTasks(), progress=False))
    with pytest.raises(Killed):
        train_run(
            cfg, tmp_path / "b", SyntheticTasks(), progress=False, on_iteration=stop_at(3, Killed)
        )
    resumed = final_parameters(
        train_run(cfg, tmp_path / "b", SyntheticTasks(), resume=True, progress=False)
    )
    for a, b in zip(reference, resumed, strict=True):
        assert torch.equal(a, b)
    rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert all(row.endswith(f",{engine}") for row in rows[1:])
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["engine"] == engine
    if engine == "vmap":  # the same curve as the sequential engine, to float32 rounding
        # (conv biases before BatchNorm have zero gradient: Adam turns its rounding noise
        # into full steps, so only the weights are compared)
        sequential = final_parameters(
            train_run(
                training_config(method, engine="sequential", **train_options),
                tmp_path / "c",
                SyntheticTasks(),
                progress=False,
            )
        )
        for a, b in zip(reference, sequential, strict=True):
            if a.dim() > 1:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# -- out of device memory ------------------------------------------------------------------
def out_of_memory_above(monkeypatch: pytest.MonkeyPatch, ops: type, tasks: int) -> None:
    """Make ``ops.score`` raise CUDA's out-of-memory error on stacks of more than ``tasks``
    tasks (after the attacks and inner loops have drawn from the attack streams)."""
    score = ops.score

    def limited(self: object, sets: list) -> list:
        if not isinstance(self, StackedOps) or sets[0][1].shape[0] > tasks:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return score(self, sets)

    monkeypatch.setattr(ops, "score", limited)


def test_a_meta_batch_that_does_not_fit_runs_in_halved_chunks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The step equals the one of ``chunk_size=2`` given beforehand, random starts included
    (the streams rewound), and the learner keeps the size that fitted."""
    attack = FFGSM(eps=EPS, generator=torch.Generator())
    tasks = make_tasks(4)
    results = []
    for fallback in (False, True):
        model = make_model("cnn4")
        learner = LEARNERS["adml"](model, adaptation_steps=2)
        learner.attack = attack  # type: ignore[union-attr]
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        if fallback:
            with monkeypatch.context() as patch:
                out_of_memory_above(patch, StackedOps, 2)
                with pytest.warns(
                    ResourceWarning, match="4 tasks at once did not fit.*chunks of 2"
                ):
                    engines.meta_step(
                        learner, seeded(tasks, attack.generator), optimizer, engine="vmap"
                    )
                assert engines.fitting_chunk_size(learner) == 2
                with warnings.catch_warnings():
                    warnings.simplefilter("error")  # later meta-batches start at 2
                    engines.meta_step(
                        learner, seeded(tasks, attack.generator), optimizer, engine="vmap"
                    )
        else:
            for _ in range(2):
                engines.meta_step(
                    learner, seeded(tasks, attack.generator), optimizer, engine="vmap", chunk_size=2
                )
            assert engines.fitting_chunk_size(learner) is None
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_out_of_memory_is_raised_where_no_smaller_chunk_exists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    learner = LEARNERS["maml"](make_model("mlp"))
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    out_of_memory_above(monkeypatch, StackedOps, 0)
    with pytest.warns(ResourceWarning), pytest.raises(torch.OutOfMemoryError):
        engines.meta_step(learner, make_tasks(2), optimizer, engine="vmap")  # 2, then 1
    assert engines.fitting_chunk_size(learner) == 1
    out_of_memory_above(monkeypatch, SequentialOps, 0)
    with pytest.raises(torch.OutOfMemoryError):  # the sequential engine has no chunks
        engines.meta_step(learner, make_tasks(2), optimizer, engine="sequential")


def test_a_resumed_run_batches_as_the_first_one_did(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunk size that fitted is in the checkpoint: the resumed run starts from it (no
    new out-of-memory fallback) and ends bit-identical to the run that was not stopped."""
    out_of_memory_above(monkeypatch, StackedOps, 1)
    cfg = training_config("maml", engine="vmap")
    with pytest.warns(ResourceWarning):
        reference = final_parameters(
            train_run(cfg, tmp_path / "a", SyntheticTasks(), progress=False)
        )
    with pytest.raises(Killed), pytest.warns(ResourceWarning):
        train_run(
            cfg, tmp_path / "b", SyntheticTasks(), progress=False, on_iteration=stop_at(3, Killed)
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        resumed = final_parameters(
            train_run(cfg, tmp_path / "b", SyntheticTasks(), resume=True, progress=False)
        )
    for a, b in zip(reference, resumed, strict=True):
        assert torch.equal(a, b)
