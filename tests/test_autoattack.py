"""AutoAttack through torchattacks: bounds, determinism, strength against PGD, evaluation."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from l2l_adversarial import PGD, Task
from l2l_adversarial.app.config import load_config
from l2l_adversarial.app.factory import evaluation_attack
from l2l_adversarial.autoattack import AutoAttack
from l2l_adversarial.evaluation import GradientLearner, Scenario, evaluate

pytest.importorskip("torchattacks")


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 5))


def inputs(count: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(count, 1, 6, 6, generator=g), torch.arange(5).repeat(count // 5)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def test_stays_in_the_ball_and_the_range_and_is_deterministic() -> None:
    model, (x, y) = tiny_model(), inputs()
    attack = AutoAttack(eps=8 / 255, seed=3, square_queries=50)
    state = torch.random.get_rng_state()
    first, second = attack(model, x, y), attack(model, x, y)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    assert torch.equal(first, second)
    assert float((first - x).abs().max()) <= 8 / 255 + 1e-6
    assert float(first.min()) >= 0 and float(first.max()) <= 1


def test_at_least_as_strong_as_pgd_on_the_same_inputs() -> None:
    model, (x, y) = tiny_model(), inputs(20)
    # train the tiny model a little, so there is accuracy to attack
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    clean = accuracy(model, x, y)
    for eps in (4 / 255, 16 / 255):
        pgd = PGD(eps=eps, steps=20, generator=torch.Generator().manual_seed(0))
        pgd_accuracy = accuracy(model, pgd(model, x, y), y)
        auto_accuracy = accuracy(model, AutoAttack(eps=eps, square_queries=50)(model, x, y), y)
        assert auto_accuracy <= pgd_accuracy <= clean
    assert clean > 0.9


def test_other_data_ranges_are_mapped_to_the_unit_interval() -> None:
    model, (x, y) = tiny_model(), inputs()
    big = AutoAttack(eps=8.0, data_range=(0.0, 255.0), seed=0, square_queries=50)(
        lambda v: model(v / 255), x * 255, y
    )
    unit = AutoAttack(eps=8 / 255, seed=0, square_queries=50)(model, x, y)
    assert torch.allclose(big / 255, unit, atol=1e-5)


def test_evaluate_attack_choices_build_the_configured_attacks() -> None:
    settings = load_config(None, ["dataset.name=digits", "evaluate.attack=pgd",
                                  "evaluate.pgd_steps=20", "evaluate.pgd_step_size=2"])["evaluate"]  # fmt: skip
    attack = evaluation_attack(settings)(8 / 255)
    assert isinstance(attack, PGD) and attack.steps == 20
    assert attack.step_size == pytest.approx(2 / 255)
    settings = load_config(None, ["dataset.name=digits", "evaluate.attack=autoattack"])["evaluate"]
    assert isinstance(evaluation_attack(settings)(8 / 255), AutoAttack)


def test_evaluation_with_autoattack_against_the_adapted_model() -> None:
    model = tiny_model()
    g = torch.Generator().manual_seed(2)
    tasks = [
        Task(torch.rand(5, 1, 6, 6, generator=g), torch.arange(5),
             torch.rand(10, 1, 6, 6, generator=g), torch.arange(5).repeat(2))
        for _ in range(2)
    ]  # fmt: skip
    common = {"method": "MAML", "epsilons": [8.0], "protocol": "adapted", "seed": 0,
              "scenarios": [Scenario(0.0, 0.0), Scenario(0.0, 1.0)]}  # fmt: skip
    learner = GradientLearner(model, lr=0.1, steps=1)
    auto = evaluate(
        learner, tasks, make_attack=functools.partial(AutoAttack, square_queries=50), **common
    )  # type: ignore[arg-type]
    pgd = evaluate(learner, tasks, make_attack=functools.partial(PGD, steps=20), **common)  # type: ignore[arg-type]
    assert auto.scenarios[1].accuracy <= pgd.scenarios[1].accuracy <= auto.scenarios[0].accuracy
    assert "AutoAttack" in auto.attacks[0]
