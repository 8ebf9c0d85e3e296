"""R-MAML, the TRADES robustness term and the KL attack against independent references.

The references are written out by hand for softmax regression (test_algorithms.py's closed
forms): the inner loop, the attacks' signed-gradient steps (for the KL objective
``grad_x' KL(p(x) || q(x')) = (q(x') - p(x)) W / N``), the two-class KL divergence, and each
meta-objective composed from them in float64.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from data_factories import SyntheticTasks, digits_config
from test_algorithms import EPS, WAYS, Weights, ce, inner_loop, make_linear, make_task, weights_of
from test_engines import assert_gradients_close, make_model, make_tasks, meta_gradient
from torch import Tensor, nn

from l2l_adversarial import (
    ADML,
    FFGSM,
    FGSM,
    MAMLAD,
    PGD,
    RMAML,
    AdversarialQuerying,
    engines,
)
from l2l_adversarial.algorithms import AdversarialMetaLearner
from l2l_adversarial.app.config import ConfigError, load_config
from l2l_adversarial.app.configs import CONFIG_FOLDER
from l2l_adversarial.app.factory import build_learner
from l2l_adversarial.app.training import train
from l2l_adversarial.attacks import Attack, Model, pixel_levels
from l2l_adversarial.autoattack import AutoAttack
from l2l_adversarial.functional import kl_divergence

ALPHA, LAMBDA = 0.4, 0.7


# -- hand-written references -------------------------------------------------------------
def probabilities(w: Weights, x: Tensor) -> Tensor:
    return torch.softmax(x @ w[0].T + w[1], 1)


def kl_by_hand(w: Weights, clean: Tensor, adversarial: Tensor) -> Tensor:
    """``mean_i sum_k p_ik (log p_ik - log q_ik)``, p on the clean rows, q on the adversarial."""
    p, q = probabilities(w, clean), probabilities(w, adversarial)
    return (p * (p.log() - q.log())).sum(1).mean()


def signed_steps(
    w: Weights, x: Tensor, y: Tensor, start: Tensor, step: float, steps: int, kl: bool
) -> Tensor:
    """``steps`` projected signed-gradient steps from ``start`` with the closed-form input
    gradient of the cross-entropy (``(q - onehot(y)) W``) or of the KL divergence from the
    clean prediction (``(q - p(x)) W``); row scaling does not change a sign."""
    with torch.no_grad():
        target = probabilities(w, x) if kl else nn.functional.one_hot(y, WAYS).to(x)
        adversarial = start.clamp(0, 1)
        for _ in range(steps):
            gradient = (probabilities(w, adversarial) - target) @ w[0]
            adversarial = adversarial + step * gradient.sign()
            adversarial = torch.min(torch.max(adversarial, x - EPS), x + EPS).clamp(0, 1)
        return adversarial


# -- the KL term and the KL attack --------------------------------------------------------
def test_kl_term_matches_the_two_class_closed_form() -> None:
    g = torch.Generator().manual_seed(0)
    clean, adversarial = torch.randn(2, 7, 2, generator=g, dtype=torch.float64)
    p, q = (
        torch.sigmoid(clean[:, 0] - clean[:, 1]),
        torch.sigmoid(adversarial[:, 0] - adversarial[:, 1]),
    )
    closed = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    torch.testing.assert_close(kl_divergence(adversarial, clean, reduction="none"), closed)
    torch.testing.assert_close(kl_divergence(adversarial, clean), closed.mean())
    assert kl_divergence(clean, clean).abs().item() < 1e-15  # zero at the clean point


@pytest.mark.parametrize(
    ("attack", "step", "steps"),
    [
        (FGSM(eps=EPS, objective="kl"), EPS, 1),
        (FFGSM(eps=EPS, objective="kl"), 1.25 * EPS, 1),
        (PGD(eps=EPS, steps=3, step_size=EPS / 2, objective="kl"), EPS / 2, 3),
        (PGD(eps=EPS, steps=3, step_size=EPS / 2), EPS / 2, 3),  # cross-entropy, same start
    ],
    ids=["fgsm-kl", "ffgsm-kl", "pgd-kl", "pgd-ce"],
)
def test_attack_objective_matches_closed_form_signed_steps(
    attack: Attack, step: float, steps: int
) -> None:
    linear, (_, _, x, y) = make_linear(), make_task()
    w = weights_of(linear)
    noise = (
        torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype) - 0.5
    ) * EPS
    expected = signed_steps(w, x, y, x + noise, step, steps, kl=attack.objective == "kl")
    adversarial = attack.with_start_noise(noise)(linear, x, y)
    torch.testing.assert_close(adversarial, expected, rtol=0, atol=1e-12)
    assert (adversarial - x).abs().max() <= EPS + 1e-12 and not torch.equal(adversarial, x + noise)


def test_kl_attack_without_a_start_of_its_own_starts_as_trades() -> None:
    """FGSM maximising the KL starts at x + 0.001 N(0, 1) (at x the KL gradient is zero)."""
    linear, (_, _, x, y) = make_linear(), make_task()
    attack = FGSM(eps=EPS, objective="kl", generator=torch.Generator().manual_seed(5))
    assert attack.draws_random and not FGSM(eps=EPS).draws_random
    start = x + 0.001 * torch.randn(
        x.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype
    )
    expected = signed_steps(weights_of(linear), x, y, start, EPS, 1, kl=True)
    torch.testing.assert_close(attack(linear, x, y), expected, rtol=0, atol=1e-12)


def test_kl_objective_needs_a_classification_loss() -> None:
    with pytest.raises(ValueError, match="objective='kl' compares the class distributions"):
        FGSM(eps=EPS, objective="kl", loss_fn=nn.functional.mse_loss)
    with pytest.raises(ValueError, match="objective must be one of 'ce', 'kl'; got 'l2'"):
        PGD(eps=EPS).maximising("l2")
    with pytest.raises(ValueError, match="AutoAttack maximises its own losses"):
        AdversarialQuerying(nn.Linear(2, 2), lr=0.1, attack=AutoAttack(EPS), robust_loss="trades")


# -- R-MAML's meta-gradient -----------------------------------------------------------------
@pytest.mark.parametrize("robust_loss", ["ce", "trades"])
@pytest.mark.parametrize("target", ["adapted", "initial"])
def test_rmaml_meta_gradient_matches_a_float64_reference_loop(
    robust_loss: str, target: str
) -> None:
    linear, task = make_linear(), make_task()
    sx, sy, qx, qy = task
    seed, steps = 11, 2
    rmaml = RMAML(
        linear, lr=ALPHA, adaptation_steps=steps, robust_weight=LAMBDA, attack_target=target,
        robust_loss=robust_loss, attack=FGSM(eps=EPS, generator=torch.Generator().manual_seed(seed)),
    )  # fmt: skip
    w = weights_of(linear)
    adapted = inner_loop(w, sx, sy, ALPHA, steps)
    attacked = adapted if target == "adapted" else w
    start = qx  # FGSM on the cross-entropy starts at x; on the KL, at x + 0.001 N(0, 1)
    if robust_loss == "trades":
        noise = torch.randn(qx.shape, generator=torch.Generator().manual_seed(seed), dtype=qx.dtype)
        start = qx + 0.001 * noise
    q_adv = signed_steps(attacked, qx, qy, start, EPS, 1, kl=robust_loss == "trades")

    def objective(v: Weights) -> Tensor:
        fast = inner_loop(v, sx, sy, ALPHA, steps)
        robust = kl_by_hand(fast, qx, q_adv) if robust_loss == "trades" else ce(fast, q_adv, qy)
        return ce(fast, qx, qy) + LAMBDA * robust

    result = rmaml.task_objective(task)
    torch.testing.assert_close(result.total, objective(w), rtol=1e-12, atol=0)
    expected = torch.autograd.grad(objective(w), w)
    ours = torch.autograd.grad(result.total, [linear.weight, linear.bias])
    for a, e in zip(ours, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    assert result.robust_loss.item() > 0 and result.clean_loss.item() > 0


def test_rmaml_default_weights() -> None:
    assert RMAML(nn.Linear(2, 2), lr=0.1).robust_weight == 0.2
    assert RMAML(nn.Linear(2, 2), lr=0.1, robust_loss="trades", trades_beta=3).robust_weight == 3
    with pytest.raises(ValueError, match="robust_weight must be a finite number >= 0"):
        RMAML(nn.Linear(2, 2), lr=0.1, robust_weight=-1.0)
    with pytest.raises(ValueError, match="robust_loss must be one of 'ce', 'trades'"):
        RMAML(nn.Linear(2, 2), lr=0.1, robust_loss="kl")


# -- the TRADES term in every adversarial learner ------------------------------------------
def trades_by_hand(w: Weights, clean: Tensor, adversarial: Tensor, labels: Tensor) -> Tensor:
    return ce(w, clean, labels) + LAMBDA * kl_by_hand(w, clean, adversarial)


@pytest.mark.parametrize("method", ["adml", "aq", "maml-ad", "maml-ad-half"])
def test_trades_term_of_each_learner_matches_a_float64_reference(method: str) -> None:
    """ADML's ``L(theta'_c, D'_adv)``, AQ's ``L(theta', D'_adv)`` and MAML-AD's query loss
    become ``CE(clean) + beta * KL(clean || adversarial)``, the query attack maximising the
    KL (from TRADES's start), the support attack and the inner loops keeping the CE."""
    linear, task = make_linear(), make_task()
    sx, sy, qx, qy = task
    seed, steps = 13, 2
    attack = FGSM(eps=EPS, generator=torch.Generator().manual_seed(seed))
    options = {"attack": attack, "adaptation_steps": steps, "robust_loss": "trades",
               "trades_beta": LAMBDA}  # fmt: skip
    w = weights_of(linear)
    noise = torch.randn(qx.shape, generator=torch.Generator().manual_seed(seed), dtype=qx.dtype)
    q_adv = signed_steps(w, qx, qy, qx + 0.001 * noise, EPS, 1, kl=True)  # against theta
    s_adv = signed_steps(w, sx, sy, sx, EPS, 1, kl=False)
    if method == "adml":
        learner: AdversarialMetaLearner = ADML(linear, lr=ALPHA, clean_lr=0.25, **options)

        def objective(v: Weights) -> Tensor:
            adversarial_branch = ce(inner_loop(v, s_adv, sy, ALPHA, steps), qx, qy)
            return adversarial_branch + trades_by_hand(
                inner_loop(v, sx, sy, 0.25, steps), qx, q_adv, qy
            )

    elif method == "aq":
        learner = AdversarialQuerying(linear, lr=ALPHA, attack_target="initial", **options)

        def objective(v: Weights) -> Tensor:
            return trades_by_hand(inner_loop(v, sx, sy, ALPHA, steps), qx, q_adv, qy)

    else:  # the support set with its adversarial rows; the query's chosen rows replaced
        fraction = 1.0 if method == "maml-ad" else 2 / 3
        learner = MAMLAD(linear, lr=ALPHA, adversarial_fraction=fraction, **options)
        # 2/3 of each class (labels in blocks): the first 2 of 3 queries, the first 1 of 2 shots
        in_class_q, in_class_s = torch.arange(len(qy)) % 3, torch.arange(len(sy)) % 2
        chosen = in_class_q < (2 if fraction < 1 else 3)
        keep = in_class_s < (1 if fraction < 1 else 2)
        q_mixed = torch.where(chosen[:, None], q_adv, qx)
        mixed, mixed_labels = torch.cat([sx, s_adv[keep]]), torch.cat([sy, sy[keep]])

        def objective(v: Weights) -> Tensor:
            return trades_by_hand(inner_loop(v, mixed, mixed_labels, ALPHA, steps), qx, q_mixed, qy)

    result = learner.task_objective(task)
    torch.testing.assert_close(result.total, objective(w), rtol=1e-12, atol=0)
    ours = torch.autograd.grad(result.total, [linear.weight, linear.bias])
    for a, e in zip(ours, torch.autograd.grad(objective(w), w), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


# -- attack placement -----------------------------------------------------------------------
class Recording(Attack):
    """Shifts every input by eps and records what it attacked: the inputs and the attacked
    model's outputs on them (which tell the parameters apart)."""

    def __init__(self) -> None:
        super().__init__(EPS)
        self.calls: list[tuple[Tensor, Tensor]] = []

    def perturb_pixels(self, forward: Model, pixels: Tensor, labels: Tensor) -> Tensor:
        self.calls.append((pixels, forward(pixels).detach()))
        return (pixels + self.eps).clamp(0, 1)


def shifted(x: Tensor) -> Tensor:
    return (x + EPS).clamp(0, 1)


PLACEMENTS = [  # (method, attack_sets, attack_target, [(set attacked, against)]) in call order
    ("adml", None, None, [("query", "theta"), ("support", "theta")]),  # Algorithm 1
    ("adml", "both", "adapted", [("support", "theta"), ("query", "clean support")]),
    ("adml", "query", "initial", [("query", "theta")]),
    ("adml", "support", "adapted", [("support", "theta")]),
    ("maml-ad", None, None, [("support", "theta"), ("query", "theta")]),  # Eq. 2-3
    ("maml-ad", "both", "adapted", [("support", "theta"), ("query", "mixed support")]),
    ("maml-ad", "query", "adapted", [("query", "clean support")]),
    ("maml-ad", "support", "initial", [("support", "theta")]),
    ("aq", None, None, [("query", "clean support")]),  # Goldblum et al.
    ("aq", "both", "adapted", [("support", "theta"), ("query", "adversarial support")]),
    ("aq", "query", "initial", [("query", "theta")]),
    ("r-maml", None, None, [("query", "clean support")]),  # Wang et al.
    ("r-maml", "both", "initial", [("support", "theta"), ("query", "theta")]),
]
CLASSES = {"adml": ADML, "maml-ad": MAMLAD, "aq": AdversarialQuerying, "r-maml": RMAML}


@pytest.mark.parametrize(("method", "sets", "target", "expected"), PLACEMENTS)
def test_placement_attacks_the_named_sets_against_the_named_parameters(
    method: str, sets: str | None, target: str | None, expected: list[tuple[str, str]]
) -> None:
    linear, task = make_linear(), make_task()
    sx, sy, qx, qy = task
    attack = Recording()
    placement = {k: v for k, v in (("attack_sets", sets), ("attack_target", target)) if v}
    learner = CLASSES[method](linear, lr=ALPHA, attack=attack, adaptation_steps=2, **placement)
    learner.task_objective(task)
    w = weights_of(linear)
    parameters = {  # by hand: theta and each inner loop's result
        "theta": w,
        "clean support": inner_loop(w, sx, sy, ALPHA, 2),
        "adversarial support": inner_loop(w, shifted(sx), sy, ALPHA, 2),
        "mixed support": inner_loop(w, torch.cat([sx, shifted(sx)]), torch.cat([sy, sy]), ALPHA, 2),
    }
    inputs = {"support": sx, "query": qx}
    assert len(attack.calls) == len(expected)
    for (attacked, outputs), (name, against) in zip(attack.calls, expected, strict=True):
        assert torch.equal(attacked, inputs[name])
        v = parameters[against]
        torch.testing.assert_close(outputs, attacked @ v[0].T + v[1], rtol=1e-12, atol=1e-12)


def test_placement_is_refused_where_it_means_nothing() -> None:
    with pytest.raises(
        ValueError, match="AdversarialQuerying's attack_sets must be one of 'query', 'both'"
    ):
        AdversarialQuerying(nn.Linear(2, 2), lr=0.1, attack_sets="support")
    with pytest.raises(ConfigError, match="train.attack_sets: 'support' means nothing for r-maml"):
        load_config(None, ["dataset.name=digits", "method=r-maml", "train.attack_sets=support"])
    with pytest.raises(ConfigError, match="train.attack_target places the attack of meta-training"):
        load_config(None, ["dataset.name=digits", "method=maml", "train.attack_target=adapted"])


# -- engines ------------------------------------------------------------------------------
ENGINE_CASES = {  # FFGSM: random starts, each task's from its own stream on both engines
    "r-maml-ce": lambda model, attack: RMAML(model, lr=0.3, attack=attack, adaptation_steps=2),
    "r-maml-trades": lambda model, attack: RMAML(
        model, lr=0.3, attack=attack, adaptation_steps=2, robust_loss="trades"
    ),
    "adml-trades": lambda model, attack: ADML(
        model, lr=0.3, clean_lr=0.2, attack=attack, adaptation_steps=2, robust_loss="trades"
    ),
    "aq-both-trades": lambda model, attack: AdversarialQuerying(
        model, lr=0.3, attack=attack, attack_sets="both", robust_loss="trades"
    ),
    "maml-ad-half-trades": lambda model, attack: MAMLAD(
        model,
        lr=0.3,
        attack=attack,
        adversarial_fraction=0.5,
        robust_loss="trades",
        attack_target="adapted",
    ),  # fmt: skip
}


@pytest.mark.parametrize(
    ("case", "model_name"),
    [*((case, "cnn4") for case in ENGINE_CASES), ("r-maml-trades", "cnn4-vmapped")],
)
def test_vmap_engine_matches_sequential(case: str, model_name: str) -> None:
    model, tasks = make_model(model_name), make_tasks(3, shots=2, queries=2)
    generator = torch.Generator()
    learner = ENGINE_CASES[case](model, FFGSM(eps=8 / 255, generator=generator))
    results = []
    for engine in ("sequential", "vmap"):
        generator.manual_seed(7)  # every task's start from its own stream of this seed
        objective = engines.meta_batch_objective(learner, tasks, engine=engine, chunk_size=2)
        results.append((objective, meta_gradient(model, objective.total)))
    (sequential, expected), (vmapped, actual) = results
    for a, e in zip(vmapped, sequential, strict=True):  # accuracies in float32
        tight = {"rtol": 1e-10, "atol": 1e-12} if a.dtype == torch.float64 else {}
        torch.testing.assert_close(a, e, equal_nan=True, **tight)
    assert_gradients_close(actual, expected)


# -- application --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    sorted(set(CONFIG_FOLDER.glob("*-r-maml*.yaml")) - set(CONFIG_FOLDER.glob("benchmark-*"))),
    ids=lambda p: Path(p).stem,
)
def test_r_maml_configs_build_their_learner(path: Path, tmp_path: Path) -> None:
    config = load_config(path, [f"dataset.root={tmp_path}"])
    learner = build_learner(config, in_channels=3, image_size=32)
    trades = path.stem.endswith("-trades")
    assert isinstance(learner, RMAML) and learner.attack_target == "adapted"
    assert learner.robust.kind == ("trades" if trades else "ce")
    assert learner.robust_weight == (3.0 if trades else 0.2)
    assert isinstance(learner.attack, FFGSM)
    assert learner.robust_attack.objective == ("kl" if trades else "ce")
    assert config["evaluate"]["attack"] == "pgd" and config["evaluate"]["eps"] == [2, 4]


def test_robustness_keys_are_refused_where_they_mean_nothing() -> None:
    base = ["dataset.name=digits"]
    with pytest.raises(ConfigError, match="train.robust_weight applies to method r-maml only"):
        load_config(None, [*base, "method=adml", "train.robust_weight=1"])
    with pytest.raises(ConfigError, match="train.robust_loss: 'trades' scores adversarial rows"):
        load_config(None, [*base, "method=maml", "train.robust_loss=trades"])
    config = load_config(
        None, [*base, "method=aq", "train.robust_loss=trades", "train.trades_beta=2"]
    )
    learner = build_learner(config, in_channels=1, image_size=16)
    assert learner.robust.kind == "trades" and learner.robust.beta == 2.0
    assert math.isclose(
        build_learner(load_config(None, [*base, "method=r-maml"]), 1, 16).robust_weight, 0.2
    )


def test_placement_and_attack_keys_reach_the_learner() -> None:
    config = digits_config("maml-ad", attack_sets="query", attack_target="adapted", attack="pgd",
                           pgd_steps=3, pgd_step_size=1.5, robust_loss="trades")  # fmt: skip
    learner = build_learner(config, in_channels=1, image_size=16)
    assert (learner.attack_sets, learner.attack_target) == ("query", "adapted")
    assert isinstance(learner.attack, PGD) and learner.attack.steps == 3
    assert math.isclose(learner.attack.step_size, pixel_levels(1.5))
    published = build_learner(digits_config("aq"), in_channels=1, image_size=16)
    assert (published.attack_sets, published.attack_target) == ("query", "adapted")


def test_r_maml_trades_trains_alike_on_both_engines(tmp_path: Path) -> None:
    """Three meta-iterations through the application, FFGSM maximising the KL."""
    finals = []
    for engine in ("sequential", "vmap"):
        config = digits_config("r-maml", iterations=3, attack="ffgsm", robust_loss="trades",
                               engine=engine, validate_every="null")  # fmt: skip
        learner = train(config, tmp_path / engine, SyntheticTasks(), progress=False)
        finals.append({name: p.detach() for name, p in learner.named_parameters()})
    initial = dict(build_learner(config, 1, 16).named_parameters())
    for name, value in finals[0].items():
        if name.endswith(".0.bias"):  # conv biases before BatchNorm: zero gradient, Adam noise
            continue
        torch.testing.assert_close(finals[1][name], value, rtol=1e-5, atol=1e-6)
        assert not torch.equal(value, initial[name])
