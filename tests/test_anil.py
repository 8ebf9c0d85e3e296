"""Head-only adaptation (ANIL): learners built with ``features=``.

The references are hand-written float64 loops in plain ``torch.autograd`` on the raw inputs:
FGSM through features and head, the inner loop on the head's parameters only
(``torch.autograd.grad`` with ``create_graph``), the meta-gradient into features and head.
"""

from __future__ import annotations

import copy

import learn2learn as l2l
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l2l_adversarial import ADML, FGSM, AdversarialQuerying, Task
from l2l_adversarial.evaluation import GradientLearner, evaluate
from l2l_adversarial.models import FeaturesThenHead
from l2l_adversarial.runtime.engine import meta_batch_objective
from l2l_adversarial.transforms import AdversarialTaskTransform

EPS, LR, CLEAN_LR, STEPS, WAYS = 0.05, 0.1, 0.05, 2, 3
Weights = list[Tensor]


def conv_features() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten())  # 1x6x6 -> 48


def network(dtype: torch.dtype = torch.float64) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return conv_features().to(dtype), nn.Linear(48, WAYS).to(dtype)


def make_task(seed: int = 1, dtype: torch.dtype = torch.float64) -> Task:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(15, 1, 6, 6, generator=generator, dtype=dtype)
    labels = torch.arange(WAYS).repeat(5)
    return Task(images[:6], labels[:6], images[6:], labels[6:])


# -- the reference: ANIL written out on the raw inputs --------------------------------------
def embed(f: Weights, x: Tensor) -> Tensor:
    return F.relu(F.conv2d(x, f[0], f[1])).flatten(1)


def logits(f: Weights, h: Weights, x: Tensor) -> Tensor:
    return F.linear(embed(f, x), h[0], h[1])


def fgsm(f: Weights, h: Weights, x: Tensor, y: Tensor) -> Tensor:
    x = x.detach().requires_grad_()
    f, h = [w.detach() for w in f], [w.detach() for w in h]
    (gradient,) = torch.autograd.grad(F.cross_entropy(logits(f, h, x), y), x)
    return (x + EPS * gradient.sign()).clamp(0, 1).detach()


def adapt_head(f: Weights, h: Weights, x: Tensor, y: Tensor, lr: float) -> Weights:
    z = embed(f, x)  # the features are not adapted
    for _ in range(STEPS):
        gradients = torch.autograd.grad(F.cross_entropy(F.linear(z, *h), y), h, create_graph=True)
        h = [w - lr * g for w, g in zip(h, gradients, strict=True)]
    return h


def reference_adml(f: Weights, h: Weights, task: Task) -> Tensor:
    sx, sy, qx, qy = task
    support_adversarial, query_adversarial = fgsm(f, h, sx, sy), fgsm(f, h, qx, qy)
    h_adv = adapt_head(f, h, support_adversarial, sy, LR)
    h_c = adapt_head(f, h, sx, sy, CLEAN_LR)
    return F.cross_entropy(logits(f, h_adv, qx), qy) + F.cross_entropy(
        logits(f, h_c, query_adversarial), qy
    )


def reference_aq(f: Weights, h: Weights, task: Task) -> Tensor:
    sx, sy, qx, qy = task
    adapted = adapt_head(f, h, sx, sy, LR)
    return F.cross_entropy(logits(f, adapted, fgsm(f, adapted, qx, qy)), qy)  # "adapted"


LEARNERS = {
    "ADML": (lambda head, features: ADML(
        head, LR, clean_lr=CLEAN_LR, features=features, adaptation_steps=STEPS,
        attack=FGSM(EPS))
    , reference_adml),
    "AQ": (lambda head, features: AdversarialQuerying(
        head, LR, features=features, adaptation_steps=STEPS, attack=FGSM(EPS))
    , reference_aq),
}  # fmt: skip


@pytest.mark.parametrize("name", list(LEARNERS))
def test_meta_gradient_reaches_features_and_head_as_the_float64_reference(name):
    make_learner, reference = LEARNERS[name]
    features, head = network()
    task = make_task()
    learner = make_learner(head, features)
    loss = learner.meta_loss(*task)
    loss.backward()
    theta = [
        p.detach().clone().requires_grad_() for p in (*features.parameters(), *head.parameters())
    ]
    expected = reference(theta[:2], theta[2:], task)
    expected_gradients = torch.autograd.grad(expected, theta)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for p, g in zip((*features.parameters(), *head.parameters()), expected_gradients, strict=True):
        assert p.grad is not None and p.grad.abs().sum() > 0
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)


def test_the_attack_sees_raw_inputs_not_feature_vectors():
    features, head = network(torch.float32)
    features.append(nn.Softplus(beta=0.5))  # features' outputs lie outside [0, 1]
    sx, sy, qx, qy = make_task(dtype=torch.float32)
    with pytest.raises(ValueError, match="outside data_range"):  # the head alone on features
        ADML(head, LR).meta_loss(features(sx), sy, features(qx), qy)
    learner = ADML(head, LR, features=features, attack=FGSM(EPS))
    assert torch.isfinite(learner.meta_loss(sx, sy, qx, qy))
    perturbed = AdversarialTaskTransform(FGSM(EPS), learner, 1.0, 1.0)(Task(sx, sy, qx, qy))
    on_raw = FGSM(EPS)(FeaturesThenHead(features, head), sx, sy)
    torch.testing.assert_close(perturbed.task.support_inputs, on_raw, rtol=0, atol=0)
    assert 0 < (on_raw - sx).abs().max() <= EPS + 1e-6


FEATURES = {  # folded (grouped convolutions, per-task batch statistics) and vmapped
    "folded": lambda: nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(),
        nn.Flatten()),
    "vmapped": lambda: nn.Sequential(nn.Flatten(), nn.Linear(36, 48), nn.LayerNorm(48), nn.Tanh()),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(FEATURES))
def test_vmap_engine_equals_sequential(kind):
    torch.manual_seed(0)
    features, head = FEATURES[kind]().double(), nn.Linear(48, WAYS).double()
    learner = ADML(head, LR, features=features, adaptation_steps=STEPS, attack=FGSM(EPS))
    tasks = [make_task(seed) for seed in range(3)]
    parameters = [*features.parameters(), *head.parameters()]
    gradients = {}
    for engine in ("sequential", "vmap"):
        objective = meta_batch_objective(learner, tasks, engine=engine)
        gradients[engine] = torch.autograd.grad(objective.total, parameters)
    for vmapped, sequential in zip(gradients["vmap"], gradients["sequential"], strict=True):
        torch.testing.assert_close(vmapped, sequential, rtol=1e-10, atol=1e-12)


def test_evaluate_scores_features_then_head_on_both_engines():
    features, head = network()
    learner = ADML(head, LR, features=features, attack=FGSM(EPS))
    tasks = [make_task(seed) for seed in range(3)]
    results = {
        engine: evaluate(
            GradientLearner(learner, lr=LR, steps=1), tasks, method="ANIL", epsilons=[1.0],
            pixel_scale=EPS, engine=engine,
        )
        for engine in ("sequential", "vmap")
    }  # fmt: skip
    f, h = list(features.parameters()), list(head.parameters())
    for query, attacked in (("clean", False), ("adversarial", True)):
        correct = [
            (logits(f, h, fgsm(f, h, qx, qy) if attacked else qx).argmax(1) == qy).double().mean()
            for _, _, qx, qy in tasks
        ]
        for result in results.values():
            entry = result.find("clean", query, 1.0)
            assert entry is not None  # step 0: theta, the query attacked against theta
            assert entry.accuracy_curve[0] == pytest.approx(100 * torch.stack(correct).mean())
    for vmapped, sequential in zip(*(r.scenarios for r in results.values()), strict=True):
        assert vmapped.loss_curve == pytest.approx(sequential.loss_curve, rel=1e-10)
        assert vmapped.accuracy_curve == sequential.accuracy_curve


def test_clone_is_learn2learns_anil_clone_sharing_the_features():
    features, head = network()
    learner = ADML(head, LR, features=features)
    assert learner.features is features
    assert [id(p) for p in learner.parameters()] == [id(p) for p in head.parameters()]
    anil = l2l.algorithms.MAML(copy.deepcopy(head), lr=LR)  # learn2learn's ANIL example
    sx, sy, qx, qy = make_task()
    losses, gradients = [], []
    for wrapper in (learner, anil):
        clone = wrapper.clone()
        clone.adapt(F.cross_entropy(clone(features(sx)), sy))
        loss = F.cross_entropy(clone(features(qx)), qy)
        losses.append(loss)
        gradients.append(torch.autograd.grad(loss, list(features.parameters())))
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for ours, theirs in zip(*gradients, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_inputs_are_checked_against_the_features_and_the_head():
    features, head = network()
    sx, sy, qx, qy = make_task()
    with pytest.raises(ValueError, match="first convolution takes 1"):
        rgb = (sx.expand(-1, 3, -1, -1), sy, qx.expand(-1, 3, -1, -1), qy)
        ADML(head, LR, features=features).meta_loss(*rgb)
    with pytest.raises(TypeError, match=r"the head Linear \(on the features' outputs\)"):
        ADML(head.float(), LR, features=features).meta_loss(sx, sy, qx, qy)
    with pytest.raises(TypeError, match="features must be a torch.nn.Module"):
        ADML(head, LR, features=lambda x: x)  # type: ignore[typeddict-item]
