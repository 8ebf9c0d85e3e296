"""Attacks against independent references: closed forms, torchattacks, invariants."""

from __future__ import annotations

import learn2learn as l2l
import pytest
import torch
from torch import nn

from l2l_adversarial import FFGSM, FGSM, PGD

EPS = 2 / 255


def linear_model(dim: int = 6, ways: int = 3, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(dim, ways).double()


def data(
    n: int = 8, dim: int = 6, ways: int = 3, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, dim, generator=g, dtype=torch.float64)
    y = torch.randint(0, ways, (n,), generator=g)
    return x, y


def closed_form_fgsm(
    model: nn.Linear, x: torch.Tensor, y: torch.Tensor, eps: float
) -> torch.Tensor:
    """FGSM on softmax regression: grad_x mean CE = (softmax(Wx+b) - onehot(y)) W / n."""
    with torch.no_grad():
        probs = torch.softmax(x @ model.weight.T + model.bias, dim=1)
        onehot = nn.functional.one_hot(y, probs.shape[1]).to(probs)
        grad = (probs - onehot) @ model.weight / x.shape[0]
    return (x + eps * grad.sign()).clamp(0, 1)


def test_fgsm_matches_closed_form_on_softmax_regression() -> None:
    model = linear_model()
    x, y = data()
    assert torch.equal(FGSM(eps=EPS)(model, x, y), closed_form_fgsm(model, x, y, EPS))


def test_one_step_pgd_without_random_start_is_fgsm() -> None:
    model = linear_model()
    x, y = data()
    pgd = PGD(eps=EPS, steps=1, step_size=EPS, random_start=False)
    assert torch.equal(pgd(model, x, y), FGSM(eps=EPS)(model, x, y))


@pytest.mark.parametrize(
    "attack",
    [
        FGSM(eps=8 / 255),
        FFGSM(eps=8 / 255, generator=torch.Generator().manual_seed(0)),
        PGD(eps=8 / 255, steps=5, generator=torch.Generator().manual_seed(0)),
    ],
)
def test_perturbation_stays_in_eps_ball_and_valid_range(attack: FGSM) -> None:
    model = linear_model()
    x, y = data(n=64)
    x[:4] = 0.0  # pixels on the range boundaries must stay inside it
    x[4:8] = 1.0
    adversarial = attack(model, x, y)
    assert (adversarial - x).abs().max() <= 8 / 255 + 1e-12
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert not torch.equal(adversarial, x)


def test_attack_with_normalisation_perturbs_in_pixel_space() -> None:
    """A model fed normalised inputs, attacked with mean/std, equals attacking the
    pixel-space model that normalises inside itself."""
    torch.manual_seed(0)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).double()
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    pixels = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1])
    pixel_model = lambda p: conv((p - m) / s)  # noqa: E731
    expected = FGSM(eps=EPS)(pixel_model, pixels, labels)
    adversarial_normalised = FGSM(eps=EPS, mean=mean, std=std)(conv, (pixels - m) / s, labels)
    torch.testing.assert_close(adversarial_normalised * s + m, expected, rtol=0, atol=1e-12)


def test_attack_leaves_model_parameters_grads_and_running_stats_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    model.train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = data(n=16)
    for attack in (FGSM(eps=EPS), PGD(eps=EPS, steps=3)):
        adversarial = attack(model, x, y)
        assert not adversarial.requires_grad and adversarial.grad_fn is None
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed"
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())


def test_attack_on_learn2learn_clone_adds_no_edge_to_the_callers_graph() -> None:
    model = linear_model()
    x, y = data()
    maml = l2l.algorithms.MAML(model, lr=0.1)

    def query_grads(run_attack: bool) -> list[torch.Tensor]:
        maml.zero_grad()
        learner = maml.clone()
        learner.adapt(nn.functional.cross_entropy(learner(x), y))
        assert not learner.module.weight.is_leaf
        if run_attack:
            adversarial = FGSM(eps=EPS)(learner, x, y)
            assert adversarial.grad_fn is None and not adversarial.requires_grad
        nn.functional.cross_entropy(learner(x), y).backward()
        return [p.grad.clone() for p in maml.parameters()]

    for with_attack, without in zip(query_grads(True), query_grads(False), strict=True):
        assert torch.equal(with_attack, without)


def test_random_start_attacks_are_deterministic_given_a_generator() -> None:
    model = linear_model()
    x, y = data()
    first = PGD(eps=EPS, steps=2, step_size=EPS / 4, generator=torch.Generator().manual_seed(3))(
        model, x, y
    )
    second = PGD(eps=EPS, steps=2, step_size=EPS / 4, generator=torch.Generator().manual_seed(3))(
        model, x, y
    )
    third = PGD(eps=EPS, steps=2, step_size=EPS / 4, generator=torch.Generator().manual_seed(4))(
        model, x, y
    )
    assert torch.equal(first, second) and not torch.equal(first, third)


def test_zero_eps_returns_the_clean_inputs() -> None:
    model = linear_model()
    x, y = data()
    assert torch.equal(FGSM(eps=0.0)(model, x, y), x)


class TestAgainstTorchattacks:
    torchattacks = pytest.importorskip("torchattacks")

    def model_and_images(self) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
        images = torch.rand(10, 3, 8, 8)
        labels = torch.randint(0, 5, (10,))
        return model, images, labels

    def test_fgsm(self) -> None:
        model, images, labels = self.model_and_images()
        theirs = self.torchattacks.FGSM(model, eps=EPS)(images, labels)
        torch.testing.assert_close(FGSM(eps=EPS)(model, images, labels), theirs, rtol=0, atol=1e-6)

    def test_pgd_without_random_start(self) -> None:
        model, images, labels = self.model_and_images()
        theirs = self.torchattacks.PGD(
            model, eps=8 / 255, alpha=2 / 255, steps=7, random_start=False
        )
        ours = PGD(eps=8 / 255, step_size=2 / 255, steps=7, random_start=False)
        torch.testing.assert_close(
            ours(model, images, labels), theirs(images, labels), rtol=0, atol=1e-6
        )


@pytest.mark.parametrize("eps", [-0.1, float("nan"), float("inf")])
def test_invalid_eps_is_rejected(eps: float) -> None:
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        FGSM(eps=eps)


def test_bad_inputs_are_rejected_with_clear_messages() -> None:
    model = linear_model()
    x, y = data()
    with pytest.raises(ValueError, match="non-finite"):
        FGSM(eps=EPS)(model, torch.full_like(x, float("nan")), y)
    with pytest.raises(ValueError, match=r"outside data_range.*255"):
        FGSM(eps=EPS)(model, x * 255, y)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        FGSM(eps=EPS)(model, x, y + 3)
    with pytest.raises(ValueError, match="mean and std must be given together"):
        FGSM(eps=EPS, mean=[0.5])
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        PGD(eps=EPS, steps=0)
    with pytest.raises(ValueError, match="data_range"):
        FGSM(eps=EPS, data_range=(1.0, 0.0))


# --- any differentiable loss, any target type --------------------------------------------------


def test_fgsm_with_mse_matches_closed_form_on_sine_range_regression() -> None:
    """grad_x mean((w x + b - y)^2) = 2 (w x + b - y) w / n, inputs in Sinusoid's [-5, 5]."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1).double()
    x = torch.linspace(-5, 5, 9, dtype=torch.float64).unsqueeze(1)
    y = torch.sin(x)
    attack = FGSM(eps=0.3, data_range=(-5.0, 5.0), loss_fn=nn.functional.mse_loss)
    with torch.no_grad():
        residual = x * model.weight + model.bias - y
        expected = (x + 0.3 * (residual * model.weight).sign()).clamp(-5, 5)
    assert torch.equal(attack(model, x, y), expected)


@pytest.mark.parametrize("attack_class", [FGSM, FFGSM, PGD])
def test_attacks_raise_a_regression_loss_on_multi_dimensional_float_targets(attack_class) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 6)).double()
    x = torch.rand(10, 4, dtype=torch.float64) * 4 - 2
    targets = torch.randn(10, 2, 3, dtype=torch.float64)

    def loss_fn(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.smooth_l1_loss(outputs.view(-1, 2, 3), target)

    kwargs = {"generator": torch.Generator().manual_seed(0)} if attack_class is not FGSM else {}
    attack = attack_class(eps=0.1, data_range=(-2.0, 2.0), loss_fn=loss_fn, **kwargs)
    adversarial = attack(model, x, targets)
    assert (adversarial - x).abs().max() <= 0.1 + 1e-12
    assert adversarial.min() >= -2 and adversarial.max() <= 2
    with torch.no_grad():
        assert loss_fn(model(adversarial), targets) > loss_fn(model(x), targets)


def test_one_step_pgd_without_random_start_is_fgsm_for_mse() -> None:
    model = linear_model(ways=2)
    x, _ = data()
    targets = torch.rand(8, 2, dtype=torch.float64)
    mse = nn.functional.mse_loss
    fgsm = FGSM(eps=EPS, loss_fn=mse)(model, x, targets)
    pgd = PGD(eps=EPS, steps=1, step_size=EPS, random_start=False, loss_fn=mse)(model, x, targets)
    assert torch.equal(fgsm, pgd)


def test_model_with_nan_weights_is_refused() -> None:
    model = linear_model()
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    x, y = data()
    for attack in (FGSM(EPS), PGD(EPS, steps=2)):
        with pytest.raises(ValueError, match="NaN or inf"):
            attack(model, x, y)


def test_malformed_arguments_name_the_argument_and_the_accepted_values() -> None:
    model = linear_model()
    x, y = data()
    with pytest.raises(TypeError, match=r"inputs are torch.float32.*parameters are torch.float64"):
        FGSM(EPS)(model, x.float(), y)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"inputs have 1 channel\(s\).*takes 3"):
        FGSM(EPS)(conv, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"shape \(4, 6\) and labels shape \(5,\).*one label"):
        FGSM(EPS)(model, x[:4], y[:5])
    with pytest.raises(ValueError, match="empty batch"):
        FGSM(EPS)(model, x[:0], y[:0])
    with pytest.raises(TypeError, match=r"integer class indices.*cross_entropy.*loss_fn="):
        FGSM(EPS)(model, x, y.double())
    with pytest.raises(TypeError, match="floating-point"):
        FGSM(EPS)(model, (x * 255).to(torch.uint8), y)
    with pytest.raises(TypeError, match="loss_fn must be a callable"):
        FGSM(EPS, loss_fn="mse")  # type: ignore[arg-type]


def test_check_values_false_skips_the_host_reads() -> None:
    model = linear_model()
    x, y = data()
    with pytest.raises(ValueError, match=r"outside data_range.*Sinusoid"):
        FGSM(EPS)(model, x * 255, y)
    out = FGSM(EPS, check_values=False)(model, x * 255, y)  # not checked: clamped to the range
    assert out.max() <= 1
