"""Bad input on the API is refused at the boundary, with what, where and the fix, on every
path: direct calls (``meta_loss``), the engines (``meta_step``, ``meta_batch_objective``),
``evaluate`` and the attacks. Each case below ended in a raw torch error (or a silent
broadcast) before these checks (issue 24, item 4).
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from l2l_adversarial import ADML, CNN4, FGSM, MAML, PGD, MatchingNetwork, Task, engines
from l2l_adversarial.evaluation import GradientLearner, MatchingLearner, evaluate
from l2l_adversarial.validation import ShapeCheckedLoss, shape_checked

WAYS, SHOTS = 3, 2


def image_task(channels: int = 1, dtype: torch.dtype = torch.float32, seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(WAYS).repeat_interleave(SHOTS)
    return Task(
        torch.rand(len(labels), channels, 16, 16, generator=g, dtype=dtype),
        labels,
        torch.rand(len(labels), channels, 16, 16, generator=g, dtype=dtype),
        labels.clone(),
    )


def cnn(channels: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return CNN4(ways=WAYS, in_channels=channels, hidden=4, image_size=16)


def with_labels(task: Task, dtype: torch.dtype) -> Task:
    return Task(task[0], task[1].to(dtype), task[2], task[3].to(dtype))


def paths(model: nn.Module) -> dict[str, Callable[[Task], object]]:
    """Every API entry a task goes through."""
    learner = ADML(model, lr=0.1)

    def step(task: Task, engine: str = "sequential") -> object:
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
        return engines.meta_step(learner, [task, task], optimizer, engine=engine)

    return {
        "meta_loss": lambda task: learner.meta_loss(*task),
        "meta_step": step,
        "meta_step vmap": lambda task: step(task, "vmap"),
        "evaluate": lambda task: evaluate(
            GradientLearner(model, lr=0.1, steps=1), [task, task], method="x", epsilons=[2.0]
        ),
        "attack": lambda task: FGSM(2 / 255)(model, task[0], task[1]),
    }


# -- labels of any integer dtype are class indices, converted to torch.long ----------------
@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.int8, torch.uint8])
def test_integer_labels_of_any_dtype_are_converted_on_every_path(dtype: torch.dtype) -> None:
    """validation's message says "torch.long; other integer types are converted": int32
    labels ended in torch's "expected target dtype to be Long or Byte, but got Int" through
    meta_loss and the attacks."""
    task = image_task()
    model = cnn()
    learner = ADML(model, lr=0.1, attack=FGSM(2 / 255))
    reference = learner.meta_loss(*task)
    assert torch.equal(learner.meta_loss(*with_labels(task, dtype)), reference)
    for attack in (FGSM(2 / 255), PGD(2 / 255, steps=2, random_start=False)):
        expected = attack(model, task[0], task[1])
        assert torch.equal(attack(model, task[0], task[1].to(dtype)), expected)
    for name, run in paths(cnn()).items():
        if name != "attack":
            run(with_labels(task, dtype))
    net = MatchingNetwork(
        nn.Sequential(nn.Flatten(), nn.Linear(256, 8)), ways=WAYS, embedding_dim=8
    )
    loss, _ = net.loss_and_accuracy(*task)
    assert torch.equal(net.loss_and_accuracy(*with_labels(task, dtype))[0], loss)


def test_float_labels_for_a_classification_loss_are_refused_naming_the_dtype() -> None:
    task = image_task()
    with pytest.raises(TypeError, match=r"torch.long; other integer types are converted.*float32"):
        ADML(cnn(), lr=0.1).meta_loss(*with_labels(task, torch.float32))


# -- dtype and channels of the inputs against the model ------------------------------------
@pytest.mark.parametrize(
    ("model_dtype", "input_dtype"),
    [(torch.float64, torch.float32), (torch.float32, torch.float64)],
)
def test_inputs_of_another_dtype_than_the_model_are_refused_naming_both(
    model_dtype: torch.dtype, input_dtype: torch.dtype
) -> None:
    """Before: "Input type (float) and bias type (double) should be the same" from conv2d."""
    task = image_task(dtype=input_dtype)
    for name, run in paths(cnn().to(model_dtype)).items():
        with pytest.raises(
            TypeError,
            match=rf"inputs are {input_dtype} but CNN4's parameters are {model_dtype}; "
            rf"convert one of them \(inputs.to\({model_dtype}\)",
        ):
            run(task)
        assert name


def test_a_query_set_of_another_dtype_than_the_support_set_is_refused() -> None:
    task = image_task()
    mixed = Task(task[0], task[1], task[2].double(), task[3])
    with pytest.raises(TypeError, match=r"inputs are torch.float64 but CNN4's parameters"):
        ADML(cnn(), lr=0.1).meta_loss(*mixed)


def test_images_with_another_channel_count_than_the_first_convolution_are_refused() -> None:
    """Before: 3-channel images into a 1-channel CNN4 ended in conv2d's "expected input ...
    to have 1 channels, but got 3 channels instead" (meta_loss, evaluate)."""
    task = image_task(channels=3)
    for name, run in paths(cnn(channels=1)).items():
        with pytest.raises(
            ValueError,
            match=r"inputs have 3 channel\(s\) \(shape \(6, 3, 16, 16\)\) but CNN4's first "
            r"convolution takes 1; pass \(N, 1, \.\.\.\) inputs or build the model with "
            r"in_channels=3",
        ):
            run(task)
        assert name


# -- regression targets of another shape than the outputs -----------------------------------
def regression_task(target_shape: tuple[int, ...]) -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(10, 1, generator=g) * 2 - 1
    y = (3 * x).reshape(target_shape)
    return Task(x, y, x.clone(), y.clone())


@pytest.mark.parametrize("loss_fn", [F.mse_loss, nn.MSELoss(), F.l1_loss, nn.HuberLoss()])
def test_regression_targets_of_another_shape_than_the_outputs_are_refused(
    loss_fn: Callable[..., Tensor],
) -> None:
    """Before: targets (N,) against outputs (N, 1) were broadcast to (N, N) with a torch
    UserWarning only: a wrong loss, silently trained on."""
    bad, good = regression_task((10,)), regression_task((10, 1))
    learner = MAML(nn.Linear(1, 1), lr=0.1, loss_fn=loss_fn)
    attack = FGSM(0.01, data_range=(-1.0, 1.0), loss_fn=loss_fn)
    adversarial = ADML(nn.Linear(1, 1), lr=0.1, loss_fn=loss_fn, attack=attack)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    runs: dict[str, Callable[[Task], object]] = {
        "meta_loss": lambda task: learner.meta_loss(*task),
        "adml meta_loss": lambda task: adversarial.meta_loss(*task),
        "attack": lambda task: attack(nn.Linear(1, 1), task[0], task[1]),
        "sequential": lambda task: engines.meta_step(learner, [task, task], optimizer),
        "vmap": lambda task: engines.meta_step(learner, [task, task], optimizer, engine="vmap"),
        "adml vmap": lambda task: engines.meta_batch_objective(
            adversarial, [task, task], engine="vmap"
        ),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's broadcast warning: never reached
        for name, run in runs.items():
            with pytest.raises(
                ValueError,
                match=r"the model's outputs have shape \(10, 1\) but the targets \(labels\) "
                r"\(10,\).*labels.reshape\(-1, 1\)",
            ):
                run(bad)
            run(good)
            assert name


def test_the_shape_checked_loss_is_the_loss_it_wraps_elsewhere() -> None:
    checked = shape_checked(F.mse_loss)
    assert isinstance(checked, ShapeCheckedLoss)
    assert checked == F.mse_loss and hash(checked) == hash(F.mse_loss)
    assert shape_checked(checked) is checked
    assert shape_checked(F.cross_entropy) is F.cross_entropy  # class indices: (N, C) vs (N,)
    custom = lambda outputs, targets: (outputs.squeeze(-1) - targets).pow(2).mean()  # noqa: E731
    assert shape_checked(custom) is custom  # a loss of its own may take any shapes
    learner = MAML(nn.Linear(1, 1), lr=0.1, loss_fn=F.mse_loss)
    assert pickle.loads(pickle.dumps(learner)).functional.loss_fn == F.mse_loss
    assert not learner.classification


# -- random operations under the batched engine -------------------------------------------
class FunctionalDropout(nn.Module):
    """Dropout in a forward pass of its own (F.dropout), which vmap_obstacle cannot see."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = nn.Linear(256, 8), nn.Linear(8, WAYS)

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = self.hidden(inputs.flatten(1)).relu()
        return self.out(F.dropout(hidden, 0.5, self.training))


@pytest.mark.parametrize("dropout", ["layer", "functional"])
def test_dropout_under_the_vmap_engine_is_refused_naming_the_sequential_engine(
    dropout: str,
) -> None:
    """Before: F.dropout in a model's own forward pass ended in torch's "vmap: called random
    operation while in randomness error mode" (meta_step, meta_batch_objective, evaluate)."""
    torch.manual_seed(0)
    model = (
        nn.Sequential(nn.Flatten(), nn.Linear(256, 8), nn.Dropout(0.5), nn.Linear(8, WAYS))
        if dropout == "layer"
        else FunctionalDropout()
    )
    task = image_task()
    learner = ADML(model, lr=0.1)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.0)
    runs: dict[str, Callable[[str], object]] = {
        "meta_step": lambda engine: engines.meta_step(
            learner, [task, task], optimizer, engine=engine
        ),
        "meta_batch_objective": lambda engine: engines.meta_batch_objective(
            learner, [task, task], engine=engine
        ),
        "evaluate": lambda engine: evaluate(
            GradientLearner(model, lr=0.1, steps=1),
            [task, task],
            method="x",
            epsilons=[2.0],
            engine=engine,
        ),
    }
    for name, run in runs.items():
        with pytest.raises(ValueError, match=r"engine='vmap' cannot run .*engine='sequential'"):
            run("vmap")
        run("sequential")  # the reference draws every task's masks
        assert name


def test_matching_networks_refuse_inputs_their_embedding_cannot_take() -> None:
    """Before: conv2d's channel error and "Input type (float) and bias type (double)" from
    loss_and_accuracy, the attacks' query model and evaluate."""
    net = MatchingNetwork(ways=WAYS, in_channels=1, image_size=16, hidden=4)
    cases = {
        r"support_inputs \(the embedding\): inputs have 3 channel\(s\).*takes 1": (
            net,
            image_task(channels=3),
        ),
        r"support_inputs \(the embedding\): inputs are torch.float32 but .*torch.float64": (
            MatchingNetwork(ways=WAYS, in_channels=1, image_size=16, hidden=4).double(),
            image_task(),
        ),
    }
    for message, (network, task) in cases.items():
        with pytest.raises((TypeError, ValueError), match=message):
            network.loss_and_accuracy(*task)
        with pytest.raises((TypeError, ValueError), match=message):
            evaluate(MatchingLearner(network), [task, task], method="m", epsilons=[2.0])
