"""The meta-test protocol against independent references written here."""

from __future__ import annotations

import copy
import functools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from l2l_adversarial import ADML, CNN4, FGSM, MLP, PGD, Task
from l2l_adversarial.evaluation import (
    EvaluationResult,
    GradientLearner,
    confidence_interval,
    evaluate,
    paper_scenarios,
)
from l2l_adversarial.transforms import AdversarialTaskTransform, derive_seed

WAYS, QUERIES, FEATURES = 3, 4, 12
LR, STEPS = 0.5, 4  # a large step so that adaptation changes predictions in a few steps
EPS_LEVELS = 8.0  # 8/255: large enough to flip predictions of the tiny model


def make_tasks(count: int, shots: int, seed: int = 0) -> list[Task]:
    generator = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(count):
        support_y = torch.arange(WAYS).repeat(shots)
        query_y = torch.arange(WAYS).repeat(QUERIES)
        tasks.append(
            Task(
                torch.rand(len(support_y), FEATURES, generator=generator),
                support_y,
                torch.rand(len(query_y), FEATURES, generator=generator),
                query_y,
            )
        )
    return tasks


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(in_features=FEATURES, ways=WAYS, hidden=(16,))


def reference_adaptation(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor):
    """Plain SGD on a copy of the model, written independently: yields the copy after each
    step 0..STEPS."""
    adapted = copy.deepcopy(model)
    yield adapted
    for _ in range(STEPS):
        adapted.zero_grad()
        nn.functional.cross_entropy(adapted(inputs), labels).backward()
        with torch.no_grad():
            for p in adapted.parameters():
                assert p.grad is not None
                p.sub_(LR * p.grad)
        yield adapted


def score(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(inputs)
    loss = float(nn.functional.cross_entropy(logits, labels))
    return loss, float((logits.argmax(-1) == labels).float().mean()) * 100


def run(model: nn.Module, tasks: list[Task], **kwargs) -> EvaluationResult:
    kwargs.setdefault("epsilons", (EPS_LEVELS,))
    return evaluate(GradientLearner(model, lr=LR, steps=STEPS), tasks, method="MAML", **kwargs)


def test_confidence_interval_on_known_numbers():
    mean, ci = confidence_interval([20.0, 40.0, 60.0, 80.0])
    # population std = sqrt((30^2 + 10^2 + 10^2 + 30^2) / 4) = sqrt(500)
    assert mean == 50.0
    assert ci == pytest.approx(1.96 * math.sqrt(500) / 2, rel=1e-12)
    assert confidence_interval([55.0] * 7) == (55.0, 0.0)
    with pytest.raises(ValueError, match="non-empty"):
        confidence_interval([])


def test_scenarios_for_one_and_five_shots():
    assert [s.name for s in paper_scenarios(1)] == [
        "Clean-Clean",
        "Clean-Adversarial",
        "Adversarial-Clean",
        "Adversarial-Adversarial",
    ]
    assert [s.name for s in paper_scenarios(5)] == [
        "Clean-Clean",
        "Clean-Adversarial",
        "40%-Clean",
        "40%-Adversarial",
        "Adversarial-Clean",
        "Adversarial-Adversarial",
    ]
    one = run(make_model(), make_tasks(2, shots=1), epsilons=(2.0, 0.2))
    five = run(make_model(), make_tasks(2, shots=5), epsilons=(2.0, 0.2))
    assert (one.shots, five.shots, one.ways) == (1, 5, WAYS)
    assert len(one.scenarios) == 4 * 2 and len(five.scenarios) == 6 * 2
    assert {(s.support, s.query) for s in five.scenarios} == {
        (support, query)
        for support in ("clean", "40%", "adversarial")
        for query in ("clean", "adversarial")
    }
    assert [s.epsilon for s in one.scenarios] == [2.0] * 4 + [0.2] * 4


def test_clean_clean_matches_hand_written_sgd_loop():
    model, tasks = make_model(), make_tasks(4, shots=2)
    result = run(model, tasks)
    losses, accuracies = [], []
    for sx, sy, qx, qy in tasks:
        curve = [score(m, qx, qy) for m in reference_adaptation(model, sx, sy)]
        losses.append([c[0] for c in curve])
        accuracies.append([c[1] for c in curve])
    clean = result.find("clean", "clean", EPS_LEVELS)
    assert clean is not None
    assert clean.task_accuracies == [a[-1] for a in accuracies]
    np.testing.assert_allclose(clean.accuracy_curve, np.mean(accuracies, axis=0), rtol=1e-12)
    np.testing.assert_allclose(clean.loss_curve, np.mean(losses, axis=0), rtol=1e-6)
    finals = np.array([a[-1] for a in accuracies])
    assert clean.accuracy == pytest.approx(finals.mean())
    assert clean.ci95 == pytest.approx(1.96 * finals.std() / math.sqrt(len(finals)))
    assert len(clean.accuracy_curve) == STEPS + 1
    assert clean.loss_curve[-1] < clean.loss_curve[0]  # adaptation did something


def test_zero_epsilon_equals_clean():
    result = run(make_model(), make_tasks(3, shots=5), epsilons=(0.0,))
    clean = result.find("clean", "clean", 0.0)
    assert clean is not None
    for entry in result.scenarios:
        assert entry.task_accuracies == clean.task_accuracies
        assert entry.loss_curve == clean.loss_curve


def test_same_tasks_give_identical_results():
    tasks = make_tasks(3, shots=5)
    pgd = functools.partial(PGD, steps=2)  # random start: seeded from (seed, task index)
    first = run(make_model(), tasks, make_attack=pgd, seed=1)
    again = run(make_model(), tasks, make_attack=pgd, seed=1)
    other = run(make_model(), tasks, make_attack=pgd, seed=2)
    assert first.to_dict() == again.to_dict()
    assert first.find("adversarial", "adversarial", EPS_LEVELS) != other.find(
        "adversarial", "adversarial", EPS_LEVELS
    )


@pytest.mark.parametrize("protocol", ["paper", "adapted"])
def test_channels_last_learners_evaluate_identically(protocol: str) -> None:
    """A learner built with channels_last=True scores its query sets channels-last: in
    float64 the accuracies are the same and the losses equal to rounding."""
    generator = torch.Generator().manual_seed(0)
    tasks = [
        Task(
            torch.rand(WAYS * 2, 3, 16, 16, generator=generator, dtype=torch.float64),
            torch.arange(WAYS).repeat(2),
            torch.rand(WAYS * QUERIES, 3, 16, 16, generator=generator, dtype=torch.float64),
            torch.arange(WAYS).repeat(QUERIES),
        )
        for _ in range(2)
    ]
    torch.manual_seed(0)
    model = CNN4(ways=WAYS, in_channels=3, hidden=4, image_size=16).double()
    results = []
    for channels_last in (False, True):
        learner = GradientLearner(ADML(model, lr=LR, channels_last=channels_last), lr=LR, steps=2)
        assert learner.query_layout(tasks[0].query_inputs).is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
        results.append(
            evaluate(learner, tasks, method="ADML", epsilons=(EPS_LEVELS,), protocol=protocol)
        )
    for default, fast in zip(results[0].scenarios, results[1].scenarios, strict=True):
        assert fast.task_accuracies == default.task_accuracies
        assert fast.loss_curve == pytest.approx(default.loss_curve, rel=1e-9)


def test_paper_protocol_attacks_theta_adapted_protocol_attacks_scored_model():
    model, tasks = make_model(), make_tasks(3, shots=2)
    fgsm = FGSM(EPS_LEVELS / 255)
    paper = run(model, tasks, protocol="paper")
    adapted = run(model, tasks, protocol="adapted")
    reference: dict[str, list[list[tuple[float, float]]]] = {
        "paper C-A": [],
        "adapted C-A": [],
        "A-C": [],
    }
    for sx, sy, qx, qy in tasks:
        query_at_theta = fgsm(model, qx, qy)
        paper_curve, adapted_curve = [], []
        for m in reference_adaptation(model, sx, sy):
            paper_curve.append(score(m, query_at_theta, qy))
            adapted_curve.append(score(m, fgsm(m, qx, qy), qy))
        reference["paper C-A"].append(paper_curve)
        reference["adapted C-A"].append(adapted_curve)
        support_at_theta = fgsm(model, sx, sy)
        reference["A-C"].append(
            [score(m, qx, qy) for m in reference_adaptation(model, support_at_theta, sy)]
        )

    def check(entry, curves):
        assert entry is not None
        np.testing.assert_allclose(entry.loss_curve, np.mean(curves, axis=0)[:, 0], rtol=1e-5)
        assert entry.task_accuracies == [c[-1][1] for c in curves]

    check(paper.find("clean", "adversarial", EPS_LEVELS), reference["paper C-A"])
    check(adapted.find("clean", "adversarial", EPS_LEVELS), reference["adapted C-A"])
    check(paper.find("adversarial", "clean", EPS_LEVELS), reference["A-C"])
    check(adapted.find("adversarial", "clean", EPS_LEVELS), reference["A-C"])
    # the two protocols agree before adaptation and differ after it
    paper_ca = paper.find("clean", "adversarial", EPS_LEVELS)
    adapted_ca = adapted.find("clean", "adversarial", EPS_LEVELS)
    assert paper_ca is not None and adapted_ca is not None
    assert paper_ca.loss_curve[0] == adapted_ca.loss_curve[0]
    assert adapted_ca.loss_curve[-1] > paper_ca.loss_curve[-1]


def test_random_start_attacks_follow_the_transform_seeding():
    model, tasks = make_model(), make_tasks(2, shots=5)
    pgd = functools.partial(PGD, steps=2)
    result = run(model, tasks, make_attack=pgd, seed=4)
    transform = AdversarialTaskTransform(pgd(EPS_LEVELS / 255), model, 0.4, 1.0)
    losses = []
    for index, task in enumerate(tasks):
        sx, sy, qx, qy = transform(task, seed=derive_seed(4, index)).task
        losses.append([score(m, qx, qy)[0] for m in reference_adaptation(model, sx, sy)])
    entry = result.find("40%", "adversarial", EPS_LEVELS)
    assert entry is not None
    np.testing.assert_allclose(entry.loss_curve, np.mean(losses, axis=0), rtol=1e-5)


def test_model_is_left_untouched_and_wrappers_are_accepted():
    model, tasks = make_model(), make_tasks(2, shots=1)
    state = copy.deepcopy(model.state_dict())
    plain = run(model, tasks)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name])
    assert all(p.grad is None for p in model.parameters())
    wrapped = evaluate(
        GradientLearner(ADML(model, lr=0.01), lr=LR, steps=STEPS),
        tasks,
        method="MAML",
        epsilons=(EPS_LEVELS,),
    )
    assert wrapped.scenarios == plain.scenarios


def test_progress_and_json_round_trip():
    class Counter:
        def __init__(self) -> None:
            self.total = 0

        def update(self, n: int = 1) -> None:
            self.total += n

    counter = Counter()
    result = run(make_model(), make_tasks(3, shots=1), progress=counter, dataset="CIFAR100")
    assert counter.total == 3
    restored = EvaluationResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert restored == result
    with pytest.raises(ValueError, match="EvaluationResult"):
        EvaluationResult.from_dict({"method": "MAML"})


def test_bad_arguments_raise_clear_errors():
    model, tasks = make_model(), make_tasks(1, shots=2)
    with pytest.raises(ValueError, match="protocol"):
        run(model, tasks, protocol="theta")
    with pytest.raises(ValueError, match="tasks is empty"):
        run(model, [])
    with pytest.raises(ValueError, match="epsilons"):
        run(model, tasks, epsilons=(-1.0,))
    mixed = tasks + make_tasks(1, shots=1)
    with pytest.raises(ValueError, match=r"tasks\[1\] is 3-way 1-shot"):
        run(model, mixed)
    unbalanced = Task(tasks[0][0][:5], tasks[0][1][:5], tasks[0][2], tasks[0][3])
    with pytest.raises(ValueError, match="same number of shots"):
        run(model, [unbalanced])
    with pytest.raises(TypeError, match="FewShotLearner"):
        evaluate(model, tasks, method="MAML")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        GradientLearner(model, steps=-1)
