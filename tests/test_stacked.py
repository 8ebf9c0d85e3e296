"""A stack of tasks, folded into channels or vmapped, against the same tasks one at a time.

The reference is ``FunctionalModel`` on one task (``adapt`` with ``torch.autograd``, the
sequential engine's inner loop); every layout must give each task's fast weights, losses,
outputs and second-order meta-gradient to float64 rounding. Which layout runs is
``fold_obstacle``'s answer, tested on the models it must fold and the ones it must not.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import pytest
import torch
from torch import Tensor, nn

from l2l_adversarial import CNN4, MLP
from l2l_adversarial.functional import FunctionalModel
from l2l_adversarial.runtime import layouts as stacked

TASKS, WAYS, SHOTS = 3, 3, 2


class OwnForward(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)


def eval_mode_batchnorm() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, groups=1), nn.BatchNorm2d(4), nn.LeakyReLU(0.1),
        nn.AvgPool2d(2), nn.Conv2d(4, 4, 3, groups=2), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, WAYS),
    )  # fmt: skip
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[8].running_mean.uniform_(-0.5, 0.5)
        net[8].running_var.uniform_(0.5, 2.0)
    return net.eval()


MODELS: dict[str, Callable[[], nn.Module]] = {
    "cnn4": lambda: CNN4(ways=WAYS, in_channels=1, hidden=4, image_size=16),
    "mlp": lambda: MLP(in_features=256, ways=WAYS, hidden=(8, 6)),
    "sequential-eval-batchnorm": eval_mode_batchnorm,
    "vmapped": lambda: OwnForward(CNN4(ways=WAYS, in_channels=1, hidden=4, image_size=16)),
}
FOLDED = {"cnn4", "mlp", "sequential-eval-batchnorm"}


def setup(name: str) -> tuple[FunctionalModel, Tensor, Tensor]:
    torch.manual_seed(0)
    tracked = name == "sequential-eval-batchnorm"
    with pytest.warns(UserWarning, match="running statistics") if tracked else nullcontext():
        functional = FunctionalModel(MODELS[name]().double())
    g = torch.Generator().manual_seed(1)
    inputs = torch.rand(TASKS, WAYS * SHOTS, 1, 16, 16, generator=g, dtype=torch.float64)
    labels = torch.stack([torch.randperm(WAYS * SHOTS, generator=g) % WAYS for _ in range(TASKS)])
    return functional, inputs, labels


@pytest.mark.parametrize("name", list(MODELS))
def test_fold_obstacle_decides_the_layout(name: str) -> None:
    functional, inputs, _ = setup(name)
    folds = stacked.fold_obstacle(functional.module, inputs.dim() - 2) is None
    assert folds == (name in FOLDED)


@pytest.mark.parametrize(
    ("model", "dims", "reason"),
    [
        (OwnForward(nn.Linear(4, 2)), 1, "has a forward pass of its own"),
        (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), 1, "LayerNorm layer '1' mixes"),
        (nn.Sequential(nn.Conv2d(1, 2, 3)), 1, "Conv2d layer '0' mixes"),  # on vectors
        (nn.Sequential(nn.Linear(16, 2)), 3, "Linear layer '0' mixes"),  # on images
        (nn.Sequential(nn.MaxPool2d(2, return_indices=True)), 3, "returns indices"),
        (nn.Sequential(nn.Dropout(0.5)), 1, "draws random masks"),
        (nn.Sequential(nn.Flatten(0)), 3, "Flatten layer '0' mixes"),
    ],
)
def test_models_that_cannot_fold_are_named(model: nn.Module, dims: int, reason: str) -> None:
    obstacle = stacked.fold_obstacle(model, dims)
    assert obstacle is not None and reason in obstacle


def test_frozen_parameters_do_not_fold() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert stacked.fold_obstacle(net, 1) is None
    net[0].weight.requires_grad_(False)
    assert "frozen parameters" in str(stacked.fold_obstacle(net, 1))


@pytest.mark.parametrize("per_task_rates", [False, True])
@pytest.mark.parametrize("name", list(MODELS))
def test_a_stack_adapts_each_task_as_the_one_task_loop_does(
    name: str, per_task_rates: bool
) -> None:
    functional, inputs, labels = setup(name)
    theta = functional.parameters()
    rates = [0.3, 0.2, 0.1] if per_task_rates else [0.3] * TASKS
    step_size: Tensor | float = torch.tensor(rates, dtype=torch.float64) if per_task_rates else 0.3
    (adapted,) = stacked.adapt(functional, theta, False, inputs, labels, step_size, steps=2)
    second = stacked.adapt(functional, adapted, True, inputs, labels, step_size, steps=1)[0]
    losses, accuracies = stacked.losses(functional, second, True, inputs, labels)
    outputs = stacked.forward(functional, second, True, TASKS)(inputs)
    meta_gradient = torch.autograd.grad(losses.sum(), list(theta.values()))
    expected_losses, expected_outputs = [], []
    for t in range(TASKS):
        fast = functional.adapt(theta, inputs[t], labels[t], rates[t], steps=3)
        for name_, p in fast.items():
            torch.testing.assert_close(second[name_][t], p, rtol=1e-10, atol=1e-12)
        loss, accuracy = functional.loss(fast, inputs[t], labels[t])
        expected_losses.append(loss)
        expected_outputs.append(functional(fast, inputs[t]))
        assert accuracies[t] == accuracy
    torch.testing.assert_close(losses, torch.stack(expected_losses), rtol=1e-10, atol=0)
    torch.testing.assert_close(outputs, torch.stack(expected_outputs), rtol=1e-10, atol=1e-12)
    expected = torch.autograd.grad(torch.stack(expected_losses).sum(), list(theta.values()))
    scale = max(float(e.abs().max()) for e in expected)
    for actual, reference in zip(meta_gradient, expected, strict=True):
        torch.testing.assert_close(actual, reference, rtol=1e-9, atol=1e-12 * scale)


@pytest.mark.parametrize("name", ["cnn4", "vmapped"])
def test_without_gradients_a_stack_gives_the_trajectory_detached(name: str) -> None:
    """What evaluation runs: every step's fast weights, no graph kept."""
    functional, inputs, labels = setup(name)
    theta = {n: p.detach() for n, p in functional.parameters().items()}
    with torch.no_grad():
        trajectory = stacked.adapt(
            functional, theta, False, inputs, labels, 0.3, steps=3, trajectory=True
        )
    assert len(trajectory) == 3
    for steps, fast in enumerate(trajectory, start=1):
        assert not any(p.requires_grad for p in fast.values())
        leaves = {n: p.clone().requires_grad_() for n, p in theta.items()}
        expected = functional.adapt(leaves, inputs[1], labels[1], 0.3, steps)
        for n, p in expected.items():
            torch.testing.assert_close(fast[n][1], p, rtol=1e-10, atol=1e-12)


def test_first_order_steps_keep_the_path_to_theta_only() -> None:
    """First order: the inner gradients are constants, the fast weights still depend on
    theta (the meta-gradient of FOMAML)."""
    functional, inputs, labels = setup("cnn4")
    theta = functional.parameters()
    (fast,) = stacked.adapt(functional, theta, False, inputs, labels, 0.3, 2, first_order=True)
    loss = stacked.losses(functional, fast, True, inputs, labels)[0].sum()
    actual = torch.autograd.grad(loss, list(theta.values()))
    reference = [
        functional.loss(functional.adapt(theta, x, y, 0.3, 2, first_order=True), x, y)[0]
        for x, y in zip(inputs, labels, strict=True)
    ]
    expected = torch.autograd.grad(torch.stack(reference).sum(), list(theta.values()))
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)
