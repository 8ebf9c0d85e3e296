"""ADML's shared support pass and the meta-batch engines against the sequential reference.

The reference is ADML's public per-task path, ``objective(adversarial_task(*task))``: attack,
then adapt, task after task (checked against closed forms in test_algorithms.py). The shared
pass must reproduce it exactly, and every engine must give its mean over the meta-batch, its
meta-gradient and its training curve to floating-point tolerance.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn

from l2l_adversarial import ADML, CNN4, FFGSM, FGSM, MLP, PGD, Task, engines
from l2l_adversarial.algorithms.adml import ADMLObjective

EPS = 8 / 255
WAYS = 3
MODELS: dict[str, Callable[[], nn.Module]] = {
    "cnn4": lambda: CNN4(ways=WAYS, in_channels=1, hidden=4, image_size=16),
    "mlp": lambda: MLP(in_features=256, ways=WAYS, hidden=(8,)),
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


def reference_loss(adml: ADML, tasks: list[Task]) -> Tensor:
    """Mean of Eq. (1) by the public per-task path: attack, then adapt."""
    losses = [adml.objective(adml.adversarial_task(*task)).total for task in tasks]
    return torch.stack(losses).mean()


def assert_gradients_close(actual: list[Tensor], expected: list[Tensor]) -> None:
    # Conv biases before BatchNorm have a zero gradient; compare on the gradient's scale.
    scale = max(float(e.abs().max()) for e in expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12 * scale)


# -- the shared support pass ---------------------------------------------------------------
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_shared_support_pass_reproduces_attack_then_adapt(
    model_name: str, steps: int, first_order: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, task = make_model(model_name), make_tasks(1)[0]

    def learner(attack: FGSM | PGD) -> ADML:
        return ADML(
            model,
            lr=0.3,
            clean_lr=0.2,
            first_order=first_order,
            adaptation_steps=steps,
            attack=attack,
        )

    shared = learner(FGSM(eps=EPS))
    # PGD with one step of size eps from the clean input is FGSM, through the generic path.
    generic = learner(PGD(eps=EPS, steps=1, step_size=EPS, random_start=False))
    assert shared.shares_support_pass and not generic.shares_support_pass
    reference = generic.adversarial_task(*task)

    theta = shared.meta_parameters()
    adversarial, clean_step = shared._fgsm_and_clean_step(theta, *task[:2])
    assert torch.equal(adversarial, reference.support_adversarial)
    expected_step = generic.adapt_functional(theta, *task[:2], lr=0.2, steps=1)
    assert all(torch.equal(clean_step[n], expected_step[n]) for n in theta)

    calls = []
    original = ADML._fgsm_and_clean_step
    monkeypatch.setattr(
        ADML, "_fgsm_and_clean_step", lambda self, *a: calls.append(1) or original(self, *a)
    )
    ours, expected = shared.task_objective(task), generic.objective(reference)
    assert calls == [1]
    for a, e in zip(ours, expected, strict=True):
        assert torch.equal(a, e)  # bit for bit
    # The gradients agree to rounding: the shared graph sums the same terms in another order.
    assert_gradients_close(meta_gradient(model, ours.total), meta_gradient(model, expected.total))
    assert shared.meta_loss(*task).item() == expected.total.item()


def test_shared_support_pass_is_used_only_where_it_is_exact() -> None:
    model = make_model("mlp")
    assert ADML(model, lr=0.1).shares_support_pass  # the default attack: FGSM(2/255)
    for attack in (
        FFGSM(eps=EPS),
        PGD(eps=EPS, steps=1, step_size=EPS, random_start=False),
        FGSM(eps=0.0),
        FGSM(eps=EPS, mean=[0.5], std=[0.25]),
        FGSM(eps=EPS, loss_fn=lambda logits, labels: -logits.gather(1, labels[:, None]).mean()),
    ):
        assert not ADML(model, lr=0.1, attack=attack).shares_support_pass, attack
    with_dropout = nn.Sequential(nn.Flatten(), nn.Linear(256, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    adml = ADML(with_dropout, lr=0.1)
    assert not adml.shares_support_pass
    with_dropout.eval()
    assert adml.shares_support_pass


# -- engines: meta-gradients ---------------------------------------------------------------
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("engine", ["sequential", "vmap"])
def test_engine_meta_gradient_matches_the_sequential_reference(
    engine: str, model_name: str, steps: int, first_order: bool
) -> None:
    model, tasks = make_model(model_name), make_tasks(3)
    adml = ADML(
        model,
        lr=0.3,
        clean_lr=0.2,
        first_order=first_order,
        adaptation_steps=steps,
        attack=FGSM(eps=EPS),
    )
    expected = reference_loss(adml, tasks)
    loss = adml.meta_batch_loss(tasks, engine=engine)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    assert_gradients_close(meta_gradient(model, loss), meta_gradient(model, expected))


def test_vmap_engine_with_attacks_against_the_adapted_model() -> None:
    model, tasks = make_model("cnn4"), make_tasks(3)
    adml = ADML(model, lr=0.3, adaptation_steps=2, attack=FGSM(eps=EPS), attack_target="adapted")
    objective = engines.meta_batch_objective(adml, tasks, engine="vmap")
    expected = [adml.objective(adml.adversarial_task(*task)) for task in tasks]
    for value, values in zip(objective, zip(*expected, strict=True), strict=True):
        torch.testing.assert_close(value, torch.stack(values).mean(), rtol=1e-12, atol=1e-12)
    reference = torch.stack([o.total for o in expected]).mean()
    assert_gradients_close(meta_gradient(model, objective.total), meta_gradient(model, reference))


def seeded(tasks: list[Task], generator: torch.Generator) -> Iterator[Task]:
    """Seed the attack's generator before yielding each task, as the training loop does."""
    for index, task in enumerate(tasks):
        generator.manual_seed(100 + index)
        yield task


@pytest.mark.parametrize("target", ["initial", "adapted"])
@pytest.mark.parametrize(
    "attack",
    [
        PGD(eps=EPS, steps=2, generator=torch.Generator()),
        FFGSM(eps=EPS, generator=torch.Generator()),
    ],
    ids=["pgd", "ffgsm"],
)
def test_vmap_engine_runs_random_start_attacks_task_by_task(
    attack: PGD | FFGSM, target: str
) -> None:
    """A task iterator that seeds the attack before each task gets the same samples."""
    assert attack.generator is not None and not engines.batches_attack(attack)
    model, tasks = make_model("cnn4"), make_tasks(3)
    adml = ADML(model, lr=0.3, attack=attack, attack_target=target)
    expected = [adml.adversarial_task(*task) for task in seeded(tasks, attack.generator)]
    ours = engines.adversarial_tasks(adml, seeded(tasks, attack.generator), engine="vmap")
    for a, e in zip(ours, expected, strict=True):
        assert torch.equal(a.support_adversarial, e.support_adversarial)
        assert (
            (a.query_adversarial is None) == (e.query_adversarial is None) == (target != "initial")
        )
        if a.query_adversarial is not None and e.query_adversarial is not None:
            assert torch.equal(a.query_adversarial, e.query_adversarial)
    attack.generator.manual_seed(5)  # for the query sets attacked against theta'_c
    objective = engines.mean_objective(adml, ours, engine="vmap")
    attack.generator.manual_seed(5)
    expected_objectives = [adml.objective(task) for task in expected]
    for value, values in zip(objective, zip(*expected_objectives, strict=True), strict=True):
        torch.testing.assert_close(value, torch.stack(values).mean(), rtol=1e-12, atol=1e-12)
    reference = torch.stack([o.total for o in expected_objectives]).mean()
    assert_gradients_close(meta_gradient(model, objective.total), meta_gradient(model, reference))


def test_vmap_engine_differentiates_layer_norm_twice() -> None:
    """Under vmap PyTorch's fused layer norm (like batch norm, covered by CNN4 above) gives
    wrong second derivatives; the engine must not."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(256, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, WAYS)
    ).double()
    tasks = make_tasks(2)
    adml = ADML(model, lr=0.5, adaptation_steps=2, attack=FGSM(eps=EPS))
    loss = adml.meta_batch_loss(tasks, engine="vmap")
    assert_gradients_close(
        meta_gradient(model, loss), meta_gradient(model, reference_loss(adml, tasks))
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
    loss = adml.meta_batch_loss(tasks, engine="vmap")
    assert_gradients_close(
        meta_gradient(model, loss), meta_gradient(model, reference_loss(adml, tasks))
    )


# -- engines: training curves --------------------------------------------------------------
def train(
    engine: str, clean_step: bool, iterations: int = 3
) -> tuple[list[Tensor], list[ADMLObjective]]:
    model = make_model("cnn4", seed=3)
    adml = ADML(model, lr=0.3, clean_lr=0.2, adaptation_steps=2, attack=FGSM(eps=EPS))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    clean_optimizer = torch.optim.SGD(model.parameters(), lr=0.05) if clean_step else None
    objectives = [
        adml.meta_step(make_tasks(2, seed=it), optimizer, clean_optimizer, engine=engine)
        for it in range(iterations)
    ]
    return [p.detach() for p in model.parameters()], objectives


@pytest.mark.parametrize("clean_step", [False, True], ids=["joint", "two-optimizers"])
def test_engines_follow_the_same_training_curve(clean_step: bool) -> None:
    parameters, objectives = train("vmap", clean_step)
    expected_parameters, expected_objectives = train("sequential", clean_step)
    for ours, theirs in zip(objectives, expected_objectives, strict=True):
        assert not ours.total.requires_grad
        for value, expected in zip(ours, theirs, strict=True):
            torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12)
    # Adam turns the rounding noise of conv biases before BatchNorm (zero gradient) into
    # steps of ~1e-9; the other parameters move by ~1e-2.
    for p, e in zip(parameters, expected_parameters, strict=True):
        torch.testing.assert_close(p, e, rtol=1e-8, atol=1e-8)
    initial = [p.detach() for p in make_model("cnn4", seed=3).parameters()]
    assert any(not torch.allclose(p, q) for p, q in zip(parameters, initial, strict=True))


# -- choosing an engine --------------------------------------------------------------------
def test_auto_picks_vmap_on_cuda_and_the_loop_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    assert engines.preferred_engine(torch.device("cuda", 0)) == "vmap"
    assert engines.preferred_engine(torch.device("cpu")) == "sequential"
    model, tasks = make_model("cnn4"), make_tasks(2)
    adml = ADML(model, lr=0.3, attack=FGSM(eps=EPS))
    assert engines.resolve_engine(adml) == "sequential"
    assert engines.resolve_engine(adml, "vmap") == "vmap"
    monkeypatch.setattr(engines, "preferred_engine", lambda device: "vmap")  # as on CUDA
    assert engines.resolve_engine(adml) == "vmap"
    # Tasks of different shapes: "auto" falls back to the loop, "vmap" refuses.
    uneven = [tasks[0], make_tasks(1, shots=1)[0]]
    loss = adml.meta_batch_loss(uneven)
    torch.testing.assert_close(loss, reference_loss(adml, uneven), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="shapes must be equal"):
        adml.meta_batch_loss(uneven, engine="vmap")


def test_vmap_obstacles_are_named_and_auto_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engines, "preferred_engine", lambda device: "vmap")  # as on CUDA
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
        adml.meta_batch_loss(make_tasks(1), engine="gpu")
    for engine in engines.ENGINES:
        with pytest.raises(ValueError, match="tasks is empty"):
            adml.meta_batch_loss([], engine=engine)
        with pytest.raises(ValueError, match="tasks is empty"):
            adml.meta_step(iter([]), optimizer, engine=engine)
    sx, sy, qx, qy = make_tasks(1)[0]
    with pytest.raises(ValueError, match=r"query_labels must lie in \[0, 3\)"):
        adml.meta_batch_loss([Task(sx, sy, qx, qy + 3)] * 2, engine="vmap")
