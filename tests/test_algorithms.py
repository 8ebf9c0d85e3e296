"""Meta-gradients of ADML, MAML-AD and Adversarial Querying against independent references.

The reference is softmax regression written out by hand: its loss and its gradient in closed
form, the inner loop as a Python loop over those closed-form gradients, and each paper
equation composed from them. The library's gradient must match the reference differentiated
by autograd (second order) and by central finite differences, and the first-order formula.
"""

from __future__ import annotations

from collections.abc import Callable

import learn2learn as l2l
import pytest
import torch
from torch import Tensor, nn

from l2l_adversarial import ADML, CNN4, FGSM, MAML, MAMLAD, MLP, AdversarialQuerying, Task, engines
from l2l_adversarial.algorithms import SequentialOps
from l2l_adversarial.algorithms.base import NameOnlySwapWarning
from l2l_adversarial.task import per_class_prefix

WAYS, DIM = 3, 5
ALPHA1, ALPHA2 = 0.4, 0.25  # large, distinct inner step sizes make every term visible
EPS = 8 / 255

Weights = tuple[Tensor, Tensor]


# -- the hand-written reference ----------------------------------------------------------
def ce(w: Weights, x: Tensor, y: Tensor) -> Tensor:
    logits = x @ w[0].T + w[1]
    return (torch.logsumexp(logits, 1) - logits.gather(1, y[:, None]).squeeze(1)).mean()


def ce_grad(w: Weights, x: Tensor, y: Tensor) -> Weights:
    """Closed-form gradient of the mean cross-entropy of softmax regression."""
    residual = (torch.softmax(x @ w[0].T + w[1], 1) - nn.functional.one_hot(y, WAYS).to(x)) / len(y)
    return residual.T @ x, residual.sum(0)


def inner_loop(w: Weights, x: Tensor, y: Tensor, lr: float, steps: int) -> Weights:
    for _ in range(steps):
        g = ce_grad(w, x, y)
        w = (w[0] - lr * g[0], w[1] - lr * g[1])
    return w


def fgsm(w: Weights, x: Tensor, y: Tensor, eps: float) -> Tensor:
    with torch.no_grad():
        residual = torch.softmax(x @ w[0].T + w[1], 1) - nn.functional.one_hot(y, WAYS).to(x)
        return (x + eps * (residual @ w[0]).sign()).clamp(0, 1)


def eq1(w: Weights, task: Task, s_adv: Tensor, q_adv: Tensor, steps: int) -> Tensor:
    """Eq. (1): L(theta - a1 grad L(theta, D_adv), D'_c) + L(theta - a2 grad L(theta, D_c), D'_adv)."""
    sx, sy, qx, qy = task
    return ce(inner_loop(w, s_adv, sy, ALPHA1, steps), qx, qy) + ce(
        inner_loop(w, sx, sy, ALPHA2, steps), q_adv, qy
    )


def finite_difference_gradient(
    objective: Callable[[Weights], Tensor], w: Weights, h: float = 1e-6
) -> Weights:
    grads = []
    for index in range(2):
        flat = w[index].detach().clone().reshape(-1)
        g = torch.zeros_like(flat)
        for j in range(flat.numel()):
            values = []
            for sign in (1, -1):
                shifted = flat.clone()
                shifted[j] += sign * h
                candidate = list(w)
                candidate[index] = shifted.view_as(w[index])
                values.append(objective((candidate[0], candidate[1])).item())
            g[j] = (values[0] - values[1]) / (2 * h)
        grads.append(g.view_as(w[index]))
    return grads[0], grads[1]


# -- fixtures ------------------------------------------------------------------------------
def make_task(shots: int = 2, queries: int = 3, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    sy = torch.arange(WAYS).repeat_interleave(shots)
    qy = torch.arange(WAYS).repeat_interleave(queries)
    sx = torch.rand(len(sy), DIM, generator=g, dtype=torch.float64)
    qx = torch.rand(len(qy), DIM, generator=g, dtype=torch.float64)
    return Task(sx, sy, qx, qy)


def make_linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(DIM, WAYS).double()


def weights_of(linear: nn.Linear) -> Weights:
    return (
        linear.weight.detach().clone().requires_grad_(),
        linear.bias.detach().clone().requires_grad_(),
    )


def library_gradient(learner: nn.Module, loss: Tensor) -> Weights:
    learner.zero_grad()
    loss.backward()
    return learner.module.weight.grad.clone(), learner.module.bias.grad.clone()


def assert_weights_close(actual: Weights, expected: Weights, atol: float = 1e-9) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=atol)


# -- ADML ----------------------------------------------------------------------------------
def attacked(adml: ADML, task: Task) -> tuple[Tensor, Tensor | None]:
    """The support and query sets ADML attacked against theta: ``(D_adv, D'_adv or None)``."""
    ops = SequentialOps(adml)
    adml.task_objective(task, ops=ops)
    if adml.attack_target == "initial":
        query, support = ops.recorded
        return support, query
    (support,) = ops.recorded
    return support, None


@pytest.mark.parametrize("steps", [1, 2])
def test_adml_meta_gradient_matches_eq1_by_autograd_and_finite_differences(steps: int) -> None:
    linear, task = make_linear(), make_task()
    adml = ADML(linear, lr=ALPHA1, clean_lr=ALPHA2, attack=FGSM(eps=EPS), adaptation_steps=steps)
    s_adv, q_adv = attacked(adml, task)
    w = weights_of(linear)
    # Lines 6 and 9: adversarial samples generated against theta (closed-form FGSM).
    assert torch.equal(s_adv, fgsm(w, task.support_inputs, task.support_labels, EPS))
    assert q_adv is not None
    assert torch.equal(q_adv, fgsm(w, task.query_inputs, task.query_labels, EPS))

    ours = library_gradient(adml, adml.meta_loss(*task))
    reference = eq1(w, task, s_adv, q_adv, steps)
    assert adml.meta_loss(*task).item() == pytest.approx(reference.item(), abs=1e-12)
    by_autograd = torch.autograd.grad(reference, w)
    assert_weights_close(ours, (by_autograd[0], by_autograd[1]))
    by_finite_differences = finite_difference_gradient(
        lambda v: eq1(v, task, s_adv, q_adv, steps), w
    )
    assert_weights_close(ours, by_finite_differences, atol=1e-7)


def test_adml_first_order_matches_the_first_order_formula() -> None:
    linear, task = make_linear(), make_task()
    adml = ADML(
        linear,
        lr=ALPHA1,
        clean_lr=ALPHA2,
        first_order=True,
        attack=FGSM(eps=EPS),
        adaptation_steps=2,
    )
    s_adv, q_adv = attacked(adml, task)
    assert q_adv is not None
    ours = library_gradient(adml, adml.meta_loss(*task))
    w = weights_of(linear)
    theta_adv = inner_loop(w, s_adv, task.support_labels, ALPHA1, 2)
    theta_c = inner_loop(w, task.support_inputs, task.support_labels, ALPHA2, 2)
    g_adv = ce_grad(theta_adv, task.query_inputs, task.query_labels)
    g_c = ce_grad(theta_c, q_adv, task.query_labels)
    assert_weights_close(ours, (g_adv[0] + g_c[0], g_adv[1] + g_c[1]))


def test_adml_attack_against_adapted_parameters() -> None:
    linear, task = make_linear(), make_task()
    adml = ADML(linear, lr=ALPHA1, clean_lr=ALPHA2, attack=FGSM(eps=EPS), attack_target="adapted")
    s_adv, no_query = attacked(adml, task)
    assert no_query is None
    w = weights_of(linear)
    theta_c = inner_loop(w, task.support_inputs, task.support_labels, ALPHA2, 1)
    q_adv = fgsm(theta_c, task.query_inputs, task.query_labels, EPS)
    ours = library_gradient(adml, adml.meta_loss(*task))
    expected = torch.autograd.grad(eq1(w, task, s_adv, q_adv, 1), w)
    assert_weights_close(ours, (expected[0], expected[1]))


@pytest.mark.parametrize("sequential", [False, True])
@pytest.mark.parametrize("engine", ["sequential", "vmap"])
def test_adml_meta_step_joint_and_sequential_updates(sequential: bool, engine: str) -> None:
    """Line 11 with SGD: the sequential second step is taken at the updated theta."""
    linear, tasks = make_linear(), [make_task(seed=1), make_task(seed=2)]
    adml = ADML(linear, lr=ALPHA1, clean_lr=ALPHA2, attack=FGSM(eps=EPS))
    beta1, beta2 = 0.3, 0.2
    w = weights_of(linear)
    adversarial = [
        (
            fgsm(w, t.support_inputs, t.support_labels, EPS),
            fgsm(w, t.query_inputs, t.query_labels, EPS),
        )
        for t in tasks
    ]

    def branch(v: Weights, which: int) -> Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for t, (s_adv, q_adv) in zip(tasks, adversarial, strict=True):
            if which == 0:
                total = total + ce(
                    inner_loop(v, s_adv, t.support_labels, ALPHA1, 1),
                    t.query_inputs,
                    t.query_labels,
                )
            else:
                total = total + ce(
                    inner_loop(v, t.support_inputs, t.support_labels, ALPHA2, 1),
                    q_adv,
                    t.query_labels,
                )
        return total / len(tasks)

    optimizer = torch.optim.SGD(adml.parameters(), lr=beta1)
    if sequential:
        clean_optimizer = torch.optim.SGD(adml.parameters(), lr=beta2)
        engines.meta_step(adml, tasks, optimizer, clean_optimizer, engine=engine)
        g1 = torch.autograd.grad(branch(w, 0), w)
        w1 = (w[0] - beta1 * g1[0], w[1] - beta1 * g1[1])
        g2 = torch.autograd.grad(branch(w1, 1), w1)  # recomputed at the updated theta
        expected = (w1[0] - beta2 * g2[0], w1[1] - beta2 * g2[1])
    else:
        engines.meta_step(adml, tasks, optimizer, engine=engine)
        g = torch.autograd.grad(branch(w, 0) + branch(w, 1), w)
        expected = (w[0] - beta1 * g[0], w[1] - beta1 * g[1])
    assert_weights_close(
        (linear.weight.detach(), linear.bias.detach()), (expected[0].detach(), expected[1].detach())
    )


# -- MAML-AD and Adversarial Querying ------------------------------------------------------
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_maml_ad_meta_gradient_matches_eq2_eq3(fraction: float) -> None:
    linear, task = make_linear(), make_task(shots=2, queries=4)
    mamlad = MAMLAD(linear, lr=ALPHA1, attack=FGSM(eps=EPS), adversarial_fraction=fraction)
    w = weights_of(linear)
    sx, sy, qx, qy = task
    s_mask, q_mask = per_class_prefix(sy, fraction), per_class_prefix(qy, fraction)
    support = (torch.cat([sx, fgsm(w, sx[s_mask], sy[s_mask], EPS)]), torch.cat([sy, sy[s_mask]]))
    query = (torch.cat([qx, fgsm(w, qx[q_mask], qy[q_mask], EPS)]), torch.cat([qy, qy[q_mask]]))

    def eq3(v: Weights) -> Tensor:
        return ce(inner_loop(v, *support, ALPHA1, 1), *query)

    ours = library_gradient(mamlad, mamlad.meta_loss(*task))
    by_autograd = torch.autograd.grad(eq3(w), w)
    assert_weights_close(ours, (by_autograd[0], by_autograd[1]))
    assert_weights_close(ours, finite_difference_gradient(eq3, w), atol=1e-7)


def test_per_class_prefix_selects_forty_percent_of_five_shots() -> None:
    labels = torch.tensor([0, 1, 2] * 5)
    mask = per_class_prefix(labels, 0.4)
    assert [int(mask[labels == c].sum()) for c in range(3)] == [2, 2, 2]
    assert per_class_prefix(labels, 0.0).sum() == 0 and per_class_prefix(labels, 1.0).all()


@pytest.mark.parametrize("target", ["adapted", "initial"])
def test_adversarial_querying_meta_gradient(target: str) -> None:
    linear, task = make_linear(), make_task()
    aq = AdversarialQuerying(
        linear, lr=ALPHA1, attack=FGSM(eps=EPS), adaptation_steps=2, attack_target=target
    )
    w = weights_of(linear)
    sx, sy, qx, qy = task
    adapted = inner_loop(w, sx, sy, ALPHA1, 2)
    q_adv = fgsm(adapted if target == "adapted" else w, qx, qy, EPS)

    def objective(v: Weights) -> Tensor:
        return ce(inner_loop(v, sx, sy, ALPHA1, 2), q_adv, qy)

    ours = library_gradient(aq, aq.meta_loss(*task))
    by_autograd = torch.autograd.grad(objective(w), w)
    assert_weights_close(ours, (by_autograd[0], by_autograd[1]))
    assert_weights_close(ours, finite_difference_gradient(objective, w), atol=1e-7)


# -- learn2learn as a second reference, and model-agnosticism ------------------------------
def learn2learn_maml_gradient(model: nn.Module, task: Task, lr: float, steps: int) -> list[Tensor]:
    """learn2learn's own MAML loop (clone, adapt per step, query loss backward)."""
    maml = l2l.algorithms.MAML(model, lr=lr)
    maml.zero_grad()
    learner = maml.clone()
    for _ in range(steps):
        learner.adapt(
            nn.functional.cross_entropy(learner(task.support_inputs), task.support_labels)
        )
    nn.functional.cross_entropy(learner(task.query_inputs), task.query_labels).backward()
    return [p.grad.clone() for p in model.parameters()]


def image_task(seed: int = 0, channels: int = 1, queries: int = 3) -> Task:
    """A 3-way 2-shot task of ``channels`` x 16 x 16 float64 images."""
    g = torch.Generator().manual_seed(seed)
    sy, qy = torch.arange(3).repeat(2), torch.arange(3).repeat(queries)
    return Task(
        torch.rand(len(sy), channels, 16, 16, generator=g, dtype=torch.float64), sy,
        torch.rand(len(qy), channels, 16, 16, generator=g, dtype=torch.float64), qy,
    )  # fmt: skip


@pytest.mark.parametrize("make_model", [
    lambda: CNN4(ways=3, in_channels=1, hidden=4, image_size=16).double(),
    lambda: MLP(in_features=256, ways=3, hidden=(8,)).double(),
])  # fmt: skip
def test_without_attack_all_methods_reduce_to_learn2learn_maml(
    make_model: Callable[[], nn.Module],
) -> None:
    """Our MAML equals learn2learn's; with eps=0 ADML's objective is twice MAML's, and
    MAML-AD's and AQ's equal it."""
    task = image_task()
    torch.manual_seed(0)
    model = make_model()
    expected = learn2learn_maml_gradient(model, task, lr=0.1, steps=2)
    no_attack = FGSM(eps=0.0)
    for learner, scale in (
        (MAML(model, lr=0.1, adaptation_steps=2), 1.0),
        (ADML(model, lr=0.1, attack=no_attack, adaptation_steps=2), 2.0),
        (
            MAMLAD(model, lr=0.1, attack=no_attack, adaptation_steps=2, adversarial_fraction=0.0),
            1.0,
        ),
        (AdversarialQuerying(model, lr=0.1, attack=no_attack, adaptation_steps=2), 1.0),
    ):
        learner.zero_grad()
        learner.meta_loss(*task).backward()
        for p, e in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p.grad, scale * e, rtol=1e-9, atol=1e-11)


def test_adml_on_cnn4_with_batchnorm_matches_directional_finite_difference() -> None:
    task = image_task(seed=3)
    torch.manual_seed(1)
    model = CNN4(ways=3, in_channels=1, hidden=4, image_size=16).double()
    adml = ADML(model, lr=0.1, attack=FGSM(eps=EPS), adaptation_steps=2)
    recorded = SequentialOps(adml)
    adml.task_objective(task, ops=recorded)  # the adversarial samples stay fixed below

    def objective() -> Tensor:
        return adml.task_objective(task, ops=SequentialOps(adml, replay=recorded.recorded)).total

    adml.zero_grad()
    objective().backward()
    params = list(model.parameters())
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction, strict=True))
    h, values = 1e-7, []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.add_(sign * h * d)
        values.append(objective().item())
        with torch.no_grad():
            for p, d in zip(params, direction, strict=True):
                p.sub_(sign * h * d)
    assert (values[0] - values[1]) / (2 * h) == pytest.approx(analytic.item(), rel=1e-5)


# -- channels-last query passes ------------------------------------------------------------
LEARNERS: dict[str, Callable[..., nn.Module]] = {
    "maml": lambda model, **kw: MAML(model, lr=0.1, adaptation_steps=2, **kw),
    "adml": lambda model, **kw: ADML(model, lr=0.1, attack=FGSM(eps=EPS), adaptation_steps=2, **kw),
    "adml-adapted": lambda model, **kw: ADML(
        model, lr=0.1, attack=FGSM(eps=EPS), adaptation_steps=2, attack_target="adapted", **kw
    ),
    "maml-ad": lambda model, **kw: MAMLAD(
        model, lr=0.1, attack=FGSM(eps=EPS), adaptation_steps=2, adversarial_fraction=0.5, **kw
    ),
    "aq": lambda model, **kw: AdversarialQuerying(
        model, lr=0.1, attack=FGSM(eps=EPS), adaptation_steps=2, **kw
    ),
}


@pytest.mark.parametrize("name", list(LEARNERS))
def test_channels_last_query_passes_give_the_same_meta_gradient(name: str) -> None:
    """channels_last changes the memory layout only: in float64 the meta-gradient (attacks
    included) equals the default layout's, and no hook is left on theta."""
    task = image_task(channels=3, queries=4)
    torch.manual_seed(0)
    model = CNN4(ways=3, in_channels=3, hidden=4, image_size=16).double()
    gradients = []
    for channels_last in (False, True):
        learner = LEARNERS[name](model, channels_last=channels_last)
        learner.zero_grad()
        learner.meta_loss(*task).backward()
        gradients.append([p.grad.clone() for p in model.parameters()])
    for default, fast in zip(*gradients, strict=True):
        torch.testing.assert_close(fast, default, rtol=1e-9, atol=1e-12)
    assert all(not p._backward_hooks for p in model.parameters())


def test_channels_last_leaves_non_image_inputs_alone() -> None:
    task = image_task()
    task = Task(task.support_inputs.flatten(1), task.support_labels,
                task.query_inputs.flatten(1), task.query_labels)  # fmt: skip
    torch.manual_seed(0)
    model = MLP(in_features=256, ways=3, hidden=(8,)).double()
    losses = [
        LEARNERS["adml"](model, channels_last=flag).meta_loss(*task).item()
        for flag in (False, True)
    ]
    assert losses[0] == losses[1]


class ViewsActivations(nn.Module):
    """A network that flattens with .view(), which channels-last activations refuse."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 16 * 16, 3)

    def forward(self, inputs: Tensor) -> Tensor:
        features = self.conv(inputs)
        return self.head(features.view(features.size(0), -1))


@pytest.mark.parametrize("name", ["maml", "adml"])
def test_channels_last_explains_models_that_view_activations(name: str) -> None:
    task = image_task(channels=3, queries=4)
    model = ViewsActivations().double()
    LEARNERS[name](model).meta_loss(*task)  # the default layout works
    with pytest.raises(
        RuntimeError, match=r"ViewsActivations calls \.view\(\).*channels_last=False"
    ):
        LEARNERS[name](model, channels_last=True).meta_loss(*task)


def test_unchanged_learn2learn_loop_runs_with_adml_swapped_in() -> None:
    task = image_task()
    torch.manual_seed(0)
    model = CNN4(ways=3, in_channels=1, hidden=4, image_size=16).double()
    maml = ADML(model, lr=0.1)  # was: l2l.algorithms.MAML(model, lr=0.1)
    learner = maml.clone()
    learner.adapt(nn.functional.cross_entropy(learner(task.support_inputs), task.support_labels))
    with pytest.warns(
        NameOnlySwapWarning, match="trains plain MAML"
    ):  # tests/test_name_only_swap.py
        nn.functional.cross_entropy(learner(task.query_inputs), task.query_labels).backward()
    assert all(p.grad is not None for p in maml.parameters())


def test_tracked_batchnorm_triggers_a_warning_and_cnn4_does_not() -> None:
    tracked = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.LazyLinear(3))
    with pytest.warns(UserWarning, match="track running statistics"):
        ADML(tracked, lr=0.01)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ADML(CNN4(ways=3, in_channels=1, image_size=16), lr=0.01)


# -- bad input -----------------------------------------------------------------------------
def test_bad_arguments_are_rejected_with_clear_messages() -> None:
    linear = make_linear()
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ADML(frozen, lr=0.01)
    with pytest.raises(ValueError, match="attack_target must be one of 'initial', 'adapted'"):
        ADML(linear, lr=0.01, attack_target="final")
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        ADML(linear, lr=-1.0)
    with pytest.raises(ValueError, match="clean_lr must be a finite number > 0"):
        ADML(linear, lr=0.01, clean_lr=float("nan"))
    with pytest.raises(ValueError, match="adaptation_steps must be an integer >= 1"):
        MAMLAD(linear, lr=0.01, adaptation_steps=0)
    with pytest.raises(ValueError, match=r"adversarial_fraction must be a number in \[0, 1\]"):
        MAMLAD(linear, lr=0.01, adversarial_fraction=1.5)
    with pytest.raises(TypeError, match="attack must be an l2l_adversarial.attacks.Attack"):
        AdversarialQuerying(linear, lr=0.01, attack=lambda m, x, y: x)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unexpected keyword argument 'epsilon'"):
        ADML(linear, lr=0.01, epsilon=0.1)  # type: ignore[call-arg]


@pytest.mark.parametrize("learner_class", [ADML, MAMLAD, AdversarialQuerying])
def test_bad_tasks_are_rejected_with_clear_messages(learner_class: type[ADML]) -> None:
    learner = learner_class(make_linear(), lr=0.01)
    sx, sy, qx, qy = make_task()
    cases = [
        ((sx[:-1], sy, qx, qy), ValueError, "support_inputs has shape"),
        ((sx, sy, qx[:, :3], qy), ValueError, "support samples have shape"),
        ((sx, sy, qx, qy + 3), ValueError, r"query_labels must lie in \[0, 3\)"),
        ((sx, sy.double(), qx, qy), TypeError, "integer class indices"),
        ((sx * float("nan"), sy, qx, qy), ValueError, "non-finite"),
        ((sx, sy, qx[:0], qy[:0]), ValueError, "query set is empty"),
    ]
    for arguments, error, message in cases:
        with pytest.raises(error, match=message):
            learner.meta_loss(*arguments)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        learner.meta_loss(sx, sy, qx, qy, steps=0)
