"""torchmeta interoperability: batch conversion (no torchmeta needed) and, when torchmeta is
installed, its real data pipeline and MetaModules feeding ADML through the shim."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import random
from collections import OrderedDict

import pytest
import torch
from torch import nn

from l2l_adversarial import ADML, FGSM, PGD, Task, engines
from l2l_adversarial.torchmeta_compat import (
    AdversarialBatches,
    batch_from_tasks,
    enable_torchmeta,
    meta_loss_of_batch,
    tasks_from_batch,
)
from l2l_adversarial.transforms import AdversarialTaskTransform, derive_seed

TASKS, WAYS, SHOTS, QUERIES, SIDE = 3, 3, 2, 4, 6


def labels(tasks: int, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Every class ``per_class`` times, in a random order per task."""
    order = torch.rand(tasks, WAYS * per_class, generator=generator).argsort(dim=1)
    return torch.arange(WAYS).repeat(per_class)[order]


def make_batch(tasks: int = TASKS, keys: tuple[str, str] = ("train", "test")) -> dict:
    generator = torch.Generator().manual_seed(0)
    support, query = keys
    return {
        support: (
            torch.rand(tasks, WAYS * SHOTS, 1, SIDE, SIDE, generator=generator),
            labels(tasks, SHOTS, generator),
        ),
        query: [  # torchmeta's default_collate yields lists; tuples and lists both work
            torch.rand(tasks, WAYS * QUERIES, 1, SIDE, SIDE, generator=generator),
            labels(tasks, QUERIES, generator),
        ],
    }


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 8), nn.ReLU(), nn.Linear(8, WAYS))


# --- batch conversion: no torchmeta needed ---------------------------------------------------


@pytest.mark.parametrize("keys", [("train", "test"), ("support", "query")])
def test_tasks_from_batch_slices_every_task(keys):
    batch = make_batch(keys=keys)
    tasks = tasks_from_batch(batch)
    assert len(tasks) == TASKS
    support, query = keys
    for index, task in enumerate(tasks):
        assert isinstance(task, Task)
        expected = (*batch[support], *batch[query])
        for got, full in zip(task, expected, strict=True):
            assert torch.equal(got, full[index])


def test_tasks_from_batch_moves_to_device():
    tasks = tasks_from_batch(make_batch(), device="meta")
    assert all(tensor.device.type == "meta" for task in tasks for tensor in task)


def test_round_trips():
    batch = make_batch()
    rebuilt = batch_from_tasks(tasks_from_batch(batch))
    assert set(rebuilt) == {"train", "test"}
    for key in ("train", "test"):
        for got, want in zip(rebuilt[key], batch[key], strict=True):
            assert torch.equal(got, want)
    tasks = tasks_from_batch(batch)
    again = tasks_from_batch(batch_from_tasks(tasks, split_names=("support", "query")))
    for task, other in zip(tasks, again, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(task, other, strict=True))


def malformed(change):
    batch = make_batch()
    change(batch)
    return batch


@pytest.mark.parametrize(
    ("batch", "error", "match"),
    [
        ([1, 2], TypeError, "batch must be a dict"),
        (malformed(lambda b: b.pop("test")), ValueError, r"keys \['train'\]; expected 'train'"),
        (malformed(lambda b: b.update(test=b["test"][:1])), ValueError, "must be a pair"),
        (
            malformed(lambda b: b.update(train=(b["train"][0].numpy(), b["train"][1]))),
            TypeError,
            r'batch\["train"\] inputs must be a torch.Tensor',
        ),
        (
            malformed(lambda b: b.update(train=(b["train"][0][0], b["train"][1][0]))),
            ValueError,
            r"expected inputs \(tasks, samples, ...\)",
        ),
        (
            malformed(lambda b: b.update(test=(b["test"][0][:2], b["test"][1][:2]))),
            ValueError,
            r'holds 3 tasks but batch\["test"\] holds 2',
        ),
        (
            malformed(lambda b: b.update(test=(b["test"][0][..., :4], b["test"][1]))),
            ValueError,
            "same transform",
        ),
        (make_batch(tasks=0), ValueError, "no tasks"),
    ],
    ids=[
        "not-a-dict",
        "missing-key",
        "not-a-pair",
        "numpy-inputs",
        "no-task-dim",
        "task-count",
        "sample-shape",
        "empty",
    ],
)
def test_tasks_from_batch_rejects_malformed_batches(batch, error, match):
    with pytest.raises(error, match=match):
        tasks_from_batch(batch)


def test_tasks_from_batch_keeps_regression_targets_of_any_shape():
    batch = {
        "train": (torch.rand(2, 5, 1), torch.rand(2, 5, 1)),
        "test": (torch.rand(2, 7, 1), torch.rand(2, 7, 2, 3)),
    }
    tasks = tasks_from_batch(batch)
    assert [tuple(t.query_labels.shape) for t in tasks] == [(7, 2, 3), (7, 2, 3)]
    assert all(t.support_labels.dtype == torch.float32 for t in tasks)


def test_batch_from_tasks_rejects_bad_tasks():
    tasks = tasks_from_batch(make_batch())
    with pytest.raises(ValueError, match="tasks is empty"):
        batch_from_tasks([])
    shorter = tasks[1]._replace(query_inputs=tasks[1].query_inputs[:-1])
    with pytest.raises(ValueError, match=r"task 1 has query_inputs of shape \(11, 1, 6, 6\)"):
        batch_from_tasks([tasks[0], shorter])
    with pytest.raises(TypeError, match="task 0 must be a Task"):
        batch_from_tasks([tasks[0][:3]])
    with pytest.raises(ValueError, match="two distinct strings"):
        batch_from_tasks(tasks, split_names=("train", "train"))


def test_meta_loss_of_batch_is_the_mean_task_loss():
    batch = make_batch()
    adml = ADML(tiny_mlp(), lr=0.1, attack=FGSM(eps=8 / 255))
    loss = meta_loss_of_batch(adml, batch)
    loss.backward()
    batch_grads = [p.grad.clone() for p in adml.parameters()]
    adml.zero_grad()
    reference = 0.0
    for index in range(TASKS):
        task_loss = adml.meta_loss(
            batch["train"][0][index],
            batch["train"][1][index],
            batch["test"][0][index],
            batch["test"][1][index],
        )
        (task_loss / TASKS).backward()
        reference += task_loss.item() / TASKS
    assert loss.item() == pytest.approx(reference, rel=1e-6)
    for got, want in zip(batch_grads, adml.parameters(), strict=True):
        torch.testing.assert_close(got, want.grad)


def test_enable_torchmeta_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    with pytest.raises(ImportError, match="install_torchmeta.sh"):
        enable_torchmeta()


# --- real torchmeta (installed by scripts/install_torchmeta.sh) -------------------------------


@pytest.fixture(scope="module")
def torchmeta():
    # Not pytest.importorskip("torchmeta"): without the shim the import itself fails on current
    # torchvision, and importorskip would silently skip an installed torchmeta.
    if importlib.util.find_spec("torchmeta") is None:
        pytest.skip("torchmeta is not installed: bash scripts/install_torchmeta.sh")
    return enable_torchmeta()


CLASSES = 6  # class c's images are c / CLASSES plus noise below 0.01: the mean identifies it


def in_memory_meta_dataset(torchmeta):
    from torchmeta.transforms import Categorical, ClassSplitter
    from torchmeta.utils.data import ClassDataset, CombinationMetaDataset, Dataset

    generator = torch.Generator().manual_seed(0)
    images = torch.arange(CLASSES).float().view(CLASSES, 1, 1, 1, 1) / CLASSES
    images = images + 0.01 * torch.rand(CLASSES, 8, 1, SIDE, SIDE, generator=generator)

    class OneClass(Dataset):
        def __init__(self, index, target_transform):
            super().__init__(index, target_transform=target_transform)

        def __len__(self):
            return images.shape[1]

        def __getitem__(self, sample):
            return images[self.index, sample], self.target_transform(self.index)

    class RandomClasses(ClassDataset):
        num_classes = CLASSES

        def __getitem__(self, index):
            return OneClass(index, self.get_target_transform(index))

    dataset = CombinationMetaDataset(
        RandomClasses(meta_train=True),
        num_classes_per_task=WAYS,
        target_transform=Categorical(WAYS),
        dataset_transform=ClassSplitter(
            shuffle=True, num_train_per_class=SHOTS, num_test_per_class=QUERIES
        ),
    )
    dataset.seed(0)
    return dataset


def meta_cnn(torchmeta):
    from torchmeta.modules import MetaBatchNorm2d, MetaConv2d, MetaLinear, MetaSequential

    torch.manual_seed(0)
    return MetaSequential(
        MetaConv2d(1, 4, 3, padding=1),
        MetaBatchNorm2d(4, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        MetaLinear(4 * SIDE * SIDE, WAYS),
    )


def test_enable_torchmeta_patches_only_torchmeta(torchmeta):
    import torchvision.datasets.utils as torchvision_utils

    assert enable_torchmeta() is torchmeta  # idempotent
    assert not hasattr(torchvision_utils, "_get_confirm_token")  # stand-ins were removed
    from torchmeta.datasets import cub, miniimagenet, tieredimagenet

    for module in (miniimagenet, tieredimagenet, cub):
        assert module.download_file_from_google_drive is (
            torchvision_utils.download_file_from_google_drive
        )


def test_split_task_works_in_a_plain_dataloader(torchmeta):
    # A plain DataLoader fetches through Subset.__getitems__, which the shim gives SubsetTask.
    task = in_memory_meta_dataset(torchmeta)[(0, 2, 5)]
    split = task["test"]
    inputs, labels = next(iter(torch.utils.data.DataLoader(split, batch_size=len(split))))
    assert torch.equal(inputs, torch.stack([split[i][0] for i in range(len(split))]))
    assert labels.tolist() == [split[i][1] for i in range(len(split))]


def test_batch_meta_dataloader_feeds_adml(torchmeta):
    from torchmeta.utils.data import BatchMetaDataLoader

    random.seed(0)  # torchmeta's task sampler
    torch.manual_seed(0)  # torchmeta's Categorical label permutation
    loader = BatchMetaDataLoader(in_memory_meta_dataset(torchmeta), batch_size=2)
    model = meta_cnn(torchmeta)
    adml = ADML(model, lr=0.1, adaptation_steps=1, attack=FGSM(eps=8 / 255))
    optimizer = torch.optim.SGD(adml.parameters(), lr=0.1)
    initial = [p.detach().clone() for p in model.parameters()]
    for step, batch in enumerate(loader):
        assert batch["train"][0].shape == (2, WAYS * SHOTS, 1, SIDE, SIDE)
        assert batch["test"][1].shape == (2, WAYS * QUERIES)
        tasks = tasks_from_batch(batch)
        for task in tasks:
            classes = {}  # label -> underlying class, from the images' means
            for inputs, labels, count in (
                (task.support_inputs, task.support_labels, SHOTS),
                (task.query_inputs, task.query_labels, QUERIES),
            ):
                assert torch.bincount(labels, minlength=WAYS).tolist() == [count] * WAYS
                for image, label in zip(inputs, labels.tolist(), strict=True):
                    source = round(image.mean().item() * CLASSES - 0.03)
                    assert classes.setdefault(label, source) == source
            assert len(set(classes.values())) == WAYS
        objective = engines.meta_step(adml, tasks, optimizer)
        assert torch.isfinite(objective.total)
        if step == 1:
            break
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), initial, strict=True))


def test_meta_module_meta_gradient_equals_plain_module(torchmeta):
    meta = meta_cnn(torchmeta).double()
    plain = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4, track_running_stats=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * SIDE * SIDE, WAYS),
    ).double()
    plain.load_state_dict(meta.state_dict())
    sx, sy, qx, qy = tasks_from_batch(make_batch())[0]
    task = Task(sx.double(), sy, qx.double(), qy)
    gradients = []
    for model in (meta, plain):
        adml = ADML(model, lr=0.1, adaptation_steps=2, attack=FGSM(eps=8 / 255))
        adml.meta_loss(*task).backward()
        gradients.append(dict(model.named_parameters()))
    assert gradients[0].keys() == gradients[1].keys()
    assert sum(p.grad.abs().sum() for p in gradients[0].values()) > 0
    for name, parameter in gradients[0].items():
        torch.testing.assert_close(parameter.grad, gradients[1][name].grad, rtol=1e-10, atol=1e-12)
    # functional_call at fast weights == torchmeta's own forward(x, params=fast)
    adml = ADML(meta, lr=0.1)
    fast = adml.functional.adapt(adml.meta_parameters(), sx.double(), sy, lr=0.1, steps=1)
    torch.testing.assert_close(
        adml.functional(fast, task.query_inputs), meta(task.query_inputs, params=OrderedDict(fast))
    )


def test_sinusoid_regression_batches_go_through_tasks_from_batch_and_fgsm(torchmeta):
    from torchmeta.toy import Sinusoid
    from torchmeta.transforms import ClassSplitter
    from torchmeta.utils.data import BatchMetaDataLoader

    dataset = Sinusoid(
        num_samples_per_task=10,
        num_tasks=4,
        dataset_transform=ClassSplitter(shuffle=False, num_train_per_class=4, num_test_per_class=6),
    )
    batch = next(iter(BatchMetaDataLoader(dataset, batch_size=2)))
    tasks = tasks_from_batch(batch)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1)).double()
    attack = FGSM(eps=0.1, data_range=(-5.0, 5.0), loss_fn=nn.functional.mse_loss)
    assert len(tasks) == 2
    for task in tasks:
        assert task.support_inputs.shape == (4, 1) and task.query_labels.shape == (6, 1)
        assert task.query_labels.dtype == torch.float64  # Sinusoid's numpy targets
        adversarial = attack(model, task.query_inputs, task.query_labels)
        assert 0 < (adversarial - task.query_inputs).abs().max() <= 0.1 + 1e-12
        with torch.no_grad():
            mse = nn.functional.mse_loss
            assert mse(model(adversarial), task.query_labels) > mse(
                model(task.query_inputs), task.query_labels
            )


SIX_SCENARIOS = [(s, q) for s in (0.0, 0.4, 1.0) for q in (0.0, 1.0)]
EPS = 8 / 255


@pytest.mark.parametrize(("support_fraction", "query_fraction"), SIX_SCENARIOS)
def test_torchmeta_loader_wrapped_keeps_its_batches_and_perturbs_the_scenario(
    torchmeta, support_fraction, query_fraction
):
    from torchmeta.utils.data import BatchMetaDataLoader

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 3))
    attack = PGD(EPS, steps=2)
    transform = AdversarialTaskTransform(attack, model, support_fraction, query_fraction)
    runs = []
    for wrap in (False, True, True):
        random.seed(0)  # torchmeta's task sampler and label permutation: the same batch
        torch.manual_seed(0)
        loader = BatchMetaDataLoader(in_memory_meta_dataset(torchmeta), batch_size=2)
        if wrap:
            runs.append(next(AdversarialBatches(loader, transform, seed=3).perturbed_batches()))
        else:
            runs.append(next(iter(loader)))
    clean, (batch, masks), (again, _) = runs
    assert set(batch) == set(clean) and torch.equal(batch["train"][0], again["train"][0])
    assert torch.equal(batch["test"][0], again["test"][0])  # seeded random start
    for key, fraction in (("train", support_fraction), ("test", query_fraction)):
        inputs, targets = batch[key]
        assert inputs.shape == clean[key][0].shape and torch.equal(targets, clean[key][1])
        assert masks[key].shape == targets.shape
        assert int(masks[key].sum()) == 2 * 3 * round(fraction * (targets.shape[1] // 3))
        assert torch.equal(inputs[~masks[key]], clean[key][0][~masks[key]])
        assert (inputs - clean[key][0]).abs().max() <= EPS + 1e-6
    # task by task, the same as the transform applied to tasks_from_batch(clean batch)
    for index, task in enumerate(tasks_from_batch(clean)):
        reference = transform(task, seed=derive_seed(3, 0, index))
        assert torch.equal(batch["train"][0][index], reference.task.support_inputs)
        assert torch.equal(batch["test"][0][index], reference.task.query_inputs)
