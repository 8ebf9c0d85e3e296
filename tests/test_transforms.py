"""Adversarial task transforms: which samples are perturbed, how, and what stays untouched."""

from __future__ import annotations

import copy

import pytest
import torch

from l2l_adversarial import FGSM, MLP, PGD, Task
from l2l_adversarial.functional import FunctionalModel
from l2l_adversarial.transforms import (
    AdversarialTaskSampler,
    AdversarialTaskTransform,
    adversarial_mask,
    derive_seed,
    perturb,
)

EPS = 8 / 255
WAYS, SHOTS, QUERIES = 3, 5, 4


def make_task(seed: int = 0, interleaved: bool = True) -> Task:
    generator = torch.Generator().manual_seed(seed)
    if interleaved:  # 0 1 2 0 1 2 ...: a class's samples are not contiguous
        support_y = torch.arange(WAYS).repeat(SHOTS)
    else:
        support_y = torch.arange(WAYS).repeat_interleave(SHOTS)
    query_y = torch.arange(WAYS).repeat(QUERIES)
    return Task(
        torch.rand(len(support_y), 1, 4, 4, generator=generator),
        support_y,
        torch.rand(len(query_y), 1, 4, 4, generator=generator),
        query_y,
    )


def make_model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(in_features=16, ways=WAYS, hidden=(8,))


def expected_mask(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """Written independently: the first ``per_class`` occurrences of every label."""
    seen: dict[int, int] = {}
    flags = []
    for label in labels.tolist():
        flags.append(seen.get(label, 0) < per_class)
        seen[label] = seen.get(label, 0) + 1
    return torch.tensor(flags)


@pytest.mark.parametrize(
    ("fraction", "support_per_class", "query_per_class"),
    [(0.0, 0, 0), (0.4, 2, 2), (1.0, 5, 4)],  # 0.4 of 5 shots = 2; 0.4 of 4 queries = 1.6 -> 2
)
@pytest.mark.parametrize("interleaved", [True, False])
def test_fraction_perturbs_exact_count_per_class(
    fraction, support_per_class, query_per_class, interleaved
):
    task = make_task(interleaved=interleaved)
    perturbed = AdversarialTaskTransform(FGSM(EPS), make_model(), fraction, fraction)(task)
    for labels, mask, per_class in (
        (task.support_labels, perturbed.support_mask, support_per_class),
        (task.query_labels, perturbed.query_mask, query_per_class),
    ):
        assert mask.dtype == torch.bool
        assert torch.bincount(labels[mask], minlength=WAYS).tolist() == [per_class] * WAYS
        assert torch.equal(mask, expected_mask(labels, per_class))


def test_masks_record_exactly_the_changed_rows():
    task = make_task()
    perturbed = AdversarialTaskTransform(FGSM(EPS), make_model(), 0.4, 1.0)(task)
    for clean, out, mask in (
        (task.support_inputs, perturbed.task.support_inputs, perturbed.support_mask),
        (task.query_inputs, perturbed.task.query_inputs, perturbed.query_mask),
    ):
        changed = (out != clean).flatten(1).any(dim=1)
        assert torch.equal(changed, mask)
        assert torch.equal(out[~mask], clean[~mask])  # bit-identical clean samples
        assert (out - clean).abs().max() <= EPS + 1e-6
        assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(perturbed.task.support_labels, task.support_labels)
    assert torch.equal(perturbed.task.query_labels, task.query_labels)


def test_adversarial_rows_are_the_attack_of_the_whole_set():
    task = make_task()
    model = make_model()
    perturbed = AdversarialTaskTransform(FGSM(EPS), model, 0.4, 1.0)(task)
    direct_support = FGSM(EPS)(model, task.support_inputs, task.support_labels)
    direct_query = FGSM(EPS)(model, task.query_inputs, task.query_labels)
    mask = perturbed.support_mask
    assert torch.equal(perturbed.task.support_inputs[mask], direct_support[mask])
    assert torch.equal(perturbed.task.query_inputs, direct_query)


def test_forty_percent_samples_are_the_adversarial_scenario_samples():
    task, model = make_task(), make_model()
    forty = AdversarialTaskTransform(PGD(EPS, steps=3), model, 0.4, 0.0)(task, seed=5)
    full = AdversarialTaskTransform(PGD(EPS, steps=3), model, 1.0, 0.0)(task, seed=5)
    mask = forty.support_mask
    assert int(mask.sum()) == 2 * WAYS
    assert torch.equal(forty.task.support_inputs[mask], full.task.support_inputs[mask])


def test_inputs_are_never_modified():
    task = make_task()
    originals = [t.clone() for t in task]
    pointers = [t.data_ptr() for t in task]
    perturbed = AdversarialTaskTransform(FGSM(EPS), make_model(), 1.0, 1.0)(task)
    for before, after, pointer in zip(originals, task, pointers, strict=True):
        assert torch.equal(before, after)
        assert after.data_ptr() == pointer
    assert perturbed.task.support_inputs.data_ptr() != task.support_inputs.data_ptr()
    perturbed.task.support_inputs.add_(1.0)  # writing into the result leaves the input alone
    assert torch.equal(task.support_inputs, originals[0])


def test_clean_fraction_returns_the_input_unchanged():
    task = make_task()
    perturbed = AdversarialTaskTransform(FGSM(EPS), make_model(), 0.0, 0.0)(task)
    assert perturbed.task.support_inputs is task.support_inputs
    assert not perturbed.support_mask.any() and not perturbed.query_mask.any()


def test_model_parameters_untouched():
    model = make_model()
    state = copy.deepcopy(model.state_dict())
    AdversarialTaskTransform(FGSM(EPS), model, 1.0, 1.0)(make_task())
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name])
    assert all(p.grad is None for p in model.parameters())


def test_functional_model_is_attacked_at_given_params():
    model = make_model()
    functional = FunctionalModel(model)
    params = {name: p.detach() + 0.3 for name, p in functional.parameters().items()}
    task = make_task()
    perturbed = AdversarialTaskTransform(FGSM(EPS), functional, 1.0, 0.0, params=params)(task)
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in shifted.named_parameters():
            p.copy_(params[name])
    reference = FGSM(EPS)(shifted, task.support_inputs, task.support_labels)
    at_theta = FGSM(EPS)(model, task.support_inputs, task.support_labels)
    assert torch.equal(perturbed.task.support_inputs, reference)
    assert not torch.equal(reference, at_theta)  # the params matter


def test_random_start_is_deterministic_given_a_seed():
    task, model = make_task(), make_model()
    attack = PGD(EPS, steps=2)
    transform = AdversarialTaskTransform(attack, model, 1.0, 1.0)
    first, again, other = transform(task, seed=3), transform(task, seed=3), transform(task, seed=4)
    assert torch.equal(first.task.support_inputs, again.task.support_inputs)
    assert torch.equal(first.task.query_inputs, again.task.query_inputs)
    assert not torch.equal(first.task.support_inputs, other.task.support_inputs)
    assert attack.generator is None  # the caller's attack is not modified


class RandomTasks:
    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.count = 0

    def sample(self) -> Task:
        self.count += 1
        return make_task(seed=1000 * self.seed + self.count)


def test_sampler_returns_perturbed_tasks_deterministically():
    model = make_model()
    transform = AdversarialTaskTransform(PGD(EPS, steps=2), model, 0.4, 1.0)
    runs = []
    for _ in range(2):
        sampler = AdversarialTaskSampler(RandomTasks(seed=1), transform, seed=7)
        runs.append([sampler.sample() for _ in range(3)])
    for a, b in zip(*runs, strict=True):
        assert isinstance(a, Task)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # the n-th task is the transform of the source's n-th task with derive_seed(seed, n)
    third_clean = make_task(seed=1000 + 3)
    expected = transform(third_clean, seed=derive_seed(7, 2))
    assert torch.equal(runs[0][2].support_inputs, expected.task.support_inputs)
    assert not torch.equal(runs[0][2].support_inputs, third_clean.support_inputs)


def test_sampler_perturbed_sample_carries_masks():
    transform = AdversarialTaskTransform(FGSM(EPS), make_model(), 0.4, 0.0)
    perturbed = AdversarialTaskSampler(RandomTasks(seed=2), transform).sample_perturbed()
    assert int(perturbed.support_mask.sum()) == 2 * WAYS
    assert not perturbed.query_mask.any()


def test_bad_arguments_raise_clear_errors():
    model = make_model()
    with pytest.raises(ValueError, match="support_fraction"):
        AdversarialTaskTransform(FGSM(EPS), model, 1.5, 0.0)
    with pytest.raises(ValueError, match="query_fraction"):
        AdversarialTaskTransform(FGSM(EPS), model, 0.0, -0.1)
    with pytest.raises(TypeError, match="Attack"):
        AdversarialTaskTransform("fgsm", model, 1.0, 1.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="params="):
        AdversarialTaskTransform(FGSM(EPS), lambda x: x, 1.0, 1.0, params={})

    class PairSource:
        def sample(self):
            return [torch.rand(4, 2), torch.arange(4)]

    sampler = AdversarialTaskSampler(PairSource(), AdversarialTaskTransform(FGSM(EPS), model))
    with pytest.raises(TypeError, match="split it into support and query"):
        sampler.sample()
    with pytest.raises(ValueError, match="inputs has shape"):
        perturb(FGSM(EPS), model, torch.rand(3, 16), torch.arange(2))
    with pytest.raises(ValueError, match="fraction"):
        adversarial_mask(torch.arange(3), 2.0)


# --- wrapping learn2learn tasksets and torchmeta loaders ------------------------------------

SIX_SCENARIOS = [(s, q) for s in (0.0, 0.4, 1.0) for q in (0.0, 1.0)]
SIDE = 4


def learn2learn_taskset(ways: int = WAYS, shots: int = SHOTS):
    """A real learn2learn Taskset as its examples build one: 2 * shots samples per class."""
    import learn2learn as l2l
    from learn2learn.data.transforms import KShots, LoadData, NWays, RemapLabels

    generator = torch.Generator().manual_seed(0)
    classes, per_class = 5, 12
    images = torch.rand(classes * per_class, 1, SIDE, SIDE, generator=generator)
    dataset = l2l.data.MetaDataset(
        torch.utils.data.TensorDataset(images, torch.arange(classes).repeat_interleave(per_class))
    )
    transforms = [
        NWays(dataset, ways),
        KShots(dataset, 2 * shots),
        LoadData(dataset),
        RemapLabels(dataset),
    ]
    return l2l.data.Taskset(dataset, transforms)


def fast_adapt_accuracy(learner, batch, shots: int, ways: int) -> float:
    """learn2learn's fast_adapt: split even/odd rows, adapt a clone, score the query."""
    data, labels = batch
    support = torch.zeros(data.size(0), dtype=torch.bool)
    support[torch.arange(shots * ways) * 2] = True
    clone = learner.clone()
    for _ in range(2):
        clone.adapt(torch.nn.functional.cross_entropy(clone(data[support]), labels[support]))
    return (clone(data[~support]).argmax(1) == labels[~support]).float().mean().item()


@pytest.mark.parametrize(("support_fraction", "query_fraction"), SIX_SCENARIOS)
def test_learn2learn_taskset_wrapped_keeps_sample_and_perturbs_the_scenario(
    support_fraction, query_fraction
):
    import random

    from l2l_adversarial.transforms import AdversarialTaskset, alternate_split

    model = make_model()
    attack = FGSM(EPS)
    transform = AdversarialTaskTransform(attack, model, support_fraction, query_fraction)
    taskset = learn2learn_taskset()
    wrapped = AdversarialTaskset(taskset, transform, seed=0)
    for _ in range(2):
        state = random.getstate()
        clean_data, labels = taskset.sample()
        random.setstate(state)  # the same task again, through the wrapper
        sampled = wrapped.sample_perturbed()
        assert torch.equal(sampled.labels, labels)
        support = alternate_split(labels)
        assert torch.equal(sampled.support, support)
        # independent reference: perturb() on each set split by hand
        for rows, fraction in ((support, support_fraction), (~support, query_fraction)):
            expected, mask = perturb(attack, model, clean_data[rows], labels[rows], fraction)
            assert torch.equal(sampled.data[rows], expected)
            assert torch.equal(sampled.perturbed[rows], mask)
            per_class = torch.bincount(labels[rows][mask], minlength=WAYS).tolist()
            assert per_class == [round(fraction * SHOTS)] * WAYS
        assert torch.equal(sampled.data[~sampled.perturbed], clean_data[~sampled.perturbed])
        assert (sampled.data - clean_data).abs().max() <= EPS + 1e-6
    random.setstate(state)
    data, labels = wrapped.sample()  # learn2learn's [data, labels] contract
    assert data.shape == clean_data.shape and data.dtype == clean_data.dtype


def test_learn2learn_evaluation_loop_gains_the_six_scenarios_by_wrapping():
    import random

    from l2l_adversarial import MAML
    from l2l_adversarial.transforms import AdversarialTaskset

    learner = MAML(make_model(), lr=0.5)
    attack = FGSM(0.3)
    accuracies = {}
    for support_fraction, query_fraction in [(None, None), *SIX_SCENARIOS]:
        random.seed(0)  # learn2learn's task sampler: the same tasks for every scenario
        taskset = learn2learn_taskset()
        if support_fraction is not None:
            transform = AdversarialTaskTransform(attack, learner, support_fraction, query_fraction)
            taskset = AdversarialTaskset(taskset, transform, seed=0)
        accuracies[support_fraction, query_fraction] = sum(
            fast_adapt_accuracy(learner, taskset.sample(), SHOTS, WAYS) for _ in range(3)
        )
    assert accuracies[0.0, 0.0] == accuracies[None, None]  # Clean-Clean is the unwrapped loop
    for support_fraction in (0.0, 0.4, 1.0):  # the attacked query costs accuracy, as it should
        assert accuracies[support_fraction, 1.0] < accuracies[support_fraction, 0.0]


def test_wrappers_refuse_what_they_cannot_wrap():
    from l2l_adversarial.torchmeta_compat import AdversarialBatches
    from l2l_adversarial.transforms import AdversarialTaskset

    transform = AdversarialTaskTransform(FGSM(EPS), make_model(), 1.0, 1.0)
    with pytest.raises(TypeError, match=r"\.sample\(\) method returning \[data, labels\]"):
        AdversarialTaskset([1, 2], transform)
    with pytest.raises(TypeError, match="transform must be an AdversarialTaskTransform"):
        AdversarialTaskset(learn2learn_taskset(), FGSM(EPS))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="transform must be an AdversarialTaskTransform"):
        AdversarialBatches([], FGSM(EPS))  # type: ignore[arg-type]
    wrapped = AdversarialTaskset(learn2learn_taskset(), transform, support=lambda y: y == 0)
    with pytest.raises(ValueError, match="query_labels"):
        wrapped.sample()  # only class 0 in the support set: query labels out of range
    bad = AdversarialTaskset(learn2learn_taskset(), transform, support=lambda y: y)
    with pytest.raises(ValueError, match="must return a bool mask"):
        bad.sample()
