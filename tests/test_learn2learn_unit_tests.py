"""learn2learn 0.2.0's own MAML unit tests, with each learner in place of
``learn2learn.algorithms.MAML``, and learn2learn's ``allow_unused``/``allow_nograd`` meaning
on this package's own paths (``meta_loss`` and the task runtime's engines).

learn2learn's ``tests/unit/algorithms/maml_test.py`` and ``tests/unit/utils_test.py`` come
from its PyPI source distribution at test time, as in ``test_learn2learn_examples.py`` (never
copied into this repository): extracted to a temporary folder, every
``l2l.algorithms.MAML(`` rewritten to the learner, imported and run with ``unittest``.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tarfile
import unittest
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from test_learn2learn_examples import learn2learn_sdist
from torch import Tensor, nn

import l2l_adversarial as l2la
from l2l_adversarial import engines
from l2l_adversarial.algorithms.base import MetaLearner, NameOnlySwapWarning
from l2l_adversarial.evaluation import GradientLearner

LEARNERS = ["MAML", "ADML", "MAMLAD", "AdversarialQuerying"]
MAML_TESTS = [
    "test_clone_module",
    "test_first_order_adaptation",
    "test_graph_connection",
    "test_adaptation",
    "test_allow_unused",
    "test_allow_nograd",
    "test_module_shared_params",
    "test_memory_consumption",  # runs on CUDA only, as in learn2learn
]
SOURCES = {
    "maml_test": ("tests/unit/algorithms/maml_test.py", "TestMAMLAlgorithm"),
    "utils_test": ("tests/unit/utils_test.py", "UtilTests"),
}
CASES = [("maml_test", name) for name in MAML_TESTS] + [("utils_test", "test_rnn_clone")]

_MODULES: dict[tuple[str, str], ModuleType] = {}


def learn2learn_test_module(source: str, learner: str, folder: Path) -> ModuleType:
    """learn2learn's test file ``source`` with ``learner`` in place of its MAML, imported."""
    key = (source, learner)
    if key not in _MODULES:
        member, _ = SOURCES[source]
        with tarfile.open(learn2learn_sdist()) as archive:
            extracted = archive.extractfile(f"learn2learn-0.2.0/{member}")
            assert extracted is not None
            text = extracted.read().decode()
        rewritten, count = re.subn(r"\bl2l\.algorithms\.MAML\(", "Learner(", text)
        assert count > 0 and "algorithms.MAML" not in rewritten, f"no MAML to replace in {member}"
        rewritten = rewritten.replace(
            "import learn2learn as l2l\n",
            f"import learn2learn as l2l\nfrom l2l_adversarial import {learner} as Learner\n",
            1,
        )
        assert "as Learner\n" in rewritten
        path = folder / f"{source}_{learner}.py"
        path.write_text(rewritten)
        spec = importlib.util.spec_from_file_location(f"l2l_{source}_{learner}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _MODULES[key] = module
    return _MODULES[key]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("learn2learn_unit_tests")


def test_the_list_of_learn2learn_tests_is_complete(sources: Path) -> None:
    """Every test of learn2learn's ``TestMAMLAlgorithm`` runs below (none silently left out)."""
    module = learn2learn_test_module("maml_test", "ADML", sources)
    found = unittest.TestLoader().getTestCaseNames(module.TestMAMLAlgorithm)
    assert sorted(found) == sorted(MAML_TESTS)


@pytest.mark.parametrize(("source", "test"), CASES, ids=[f"{s}::{t}" for s, t in CASES])
@pytest.mark.parametrize("learner", LEARNERS)
def test_learn2learn_unit_test_passes(learner: str, source: str, test: str, sources: Path) -> None:
    module = learn2learn_test_module(source, learner, sources)
    case = getattr(module, SOURCES[source][1])(test)
    result = unittest.TestResult()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        # learn2learn's tests train through clone(): this package's name-only-swap warning
        # says so (tests/test_name_only_swap.py); Softmax() without dim warns in torch
        warnings.simplefilter("ignore", NameOnlySwapWarning)
        warnings.filterwarnings("ignore", "Implicit dimension choice", UserWarning)
        warnings.filterwarnings("ignore", "The .grad attribute of a Tensor that is not a leaf")
        case.run(result)
    problems = [text for _, text in result.errors + result.failures]
    assert result.testsRun == 1 and not problems, "\n".join(problems)


# -- the same switches on this package's own paths ------------------------------------------
CLASSES: list[type[MetaLearner]] = [l2la.MAML, l2la.ADML, l2la.MAMLAD, l2la.AdversarialQuerying]
ENGINES = ["sequential", "vmap"]


class HalfUsed(nn.Module):
    """A model with a layer its forward pass never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(8, 3)
        self.unused = nn.Linear(8, 3)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.used(inputs)


def frozen_model() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    net[0].weight.requires_grad_(False)
    return net


def tasks(count: int = 2) -> list[l2la.Task]:
    generator = torch.Generator().manual_seed(1)
    return [
        l2la.Task(
            torch.rand(3, 8, generator=generator, dtype=torch.float64),
            torch.arange(3),
            torch.rand(6, 8, generator=generator, dtype=torch.float64),
            torch.arange(3).repeat(2),
        )
        for _ in range(count)
    ]


def meta_gradient(learner: MetaLearner, engine: str) -> dict[str, Tensor | None]:
    class Keep(torch.optim.SGD):
        def step(self, closure: object = None) -> None:  # type: ignore[override]
            pass  # keep theta: compare the gradients only

    engines.meta_step(learner, tasks(), Keep(learner.parameters(), lr=0.1), engine=engine)
    return {n: None if p.grad is None else p.grad.clone() for n, p in learner.named_parameters()}


@pytest.mark.parametrize("cls", CLASSES)
def test_the_constructor_takes_learn2learns_arguments(cls: type[MetaLearner]) -> None:
    net = nn.Linear(8, 3)
    learner = cls(net, 0.1, True, False, True)  # positional, as learn2learn's MAML takes them
    assert (learner.lr, learner.first_order) == (0.1, True)
    assert (learner.allow_unused, learner.allow_nograd) == (False, True)
    assert cls(net, 0.1).allow_unused is False and cls(net, 0.1).allow_nograd is False
    defaulted = cls(net, 0.1, allow_nograd=True)  # allow_unused defaults to allow_nograd
    assert defaulted.allow_unused is True
    clone = defaulted.clone()
    assert (clone.allow_unused, clone.allow_nograd) == (True, True)
    assert defaulted.clone(allow_nograd=False).allow_nograd is False
    assert cls(net, 0.1, allow_unused=np.True_, allow_nograd=0).allow_unused is True
    with pytest.raises(TypeError, match="allow_nograd must be True or False, got 'yes'"):
        cls(net, 0.1, allow_nograd="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="allow_unused must be True or False"):
        cls(net, 0.1, allow_unused=0.5)  # type: ignore[arg-type]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cls", CLASSES)
def test_frozen_parameters_raise_unless_allow_nograd(cls: type[MetaLearner], engine: str) -> None:
    learner = cls(frozen_model(), 0.1)  # learn2learn raises in adapt(), not here
    with pytest.raises(RuntimeError, match=r"frozen parameters .*'0\.weight'.*allow_nograd=True"):
        meta_gradient(learner, engine)
    with pytest.raises(RuntimeError, match="allow_nograd=True"):
        learner.meta_loss(*tasks(1)[0])


@pytest.mark.parametrize("cls", CLASSES)
def test_with_allow_nograd_frozen_parameters_stay_frozen_on_every_engine(
    cls: type[MetaLearner],
) -> None:
    """No gradient, no change, and the same meta-gradient on every engine (the batched one
    runs the frozen model vmapped: folding refuses frozen parameters)."""
    gradients = {}
    for engine in ENGINES:
        net = frozen_model()
        frozen = net[0].weight.detach().clone()
        learner = cls(net, 0.1, allow_nograd=True)
        gradients[engine] = meta_gradient(learner, engine)
        optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
        engines.meta_step(learner, tasks(), optimizer, engine=engine)
        assert net[0].weight.grad is None and torch.equal(net[0].weight, frozen)
        assert not net[0].weight.requires_grad
    assert gradients["sequential"]["module.0.weight"] is None
    for name, reference in gradients["sequential"].items():
        actual = gradients["vmap"][name]
        if reference is None:
            assert actual is None, name
        else:
            assert actual is not None, name
            torch.testing.assert_close(actual, reference, rtol=1e-9, atol=1e-12)
    # learn2learn's own path agrees: a clone adapts around the frozen weight
    clone = cls(frozen_model(), 0.1, allow_nograd=True).clone()
    clone.adapt(clone(tasks(1)[0].support_inputs).sum())


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("cls", CLASSES)
def test_unused_parameters_raise_unless_allow_unused(cls: type[MetaLearner], engine: str) -> None:
    torch.manual_seed(0)
    model = HalfUsed().double()
    with pytest.raises(RuntimeError, match=r"does not use .*'unused\.weight'.*allow_unused=True"):
        meta_gradient(cls(model, 0.1), engine)
    with pytest.raises(RuntimeError, match="allow_unused=True"):
        meta_gradient(cls(model, 0.1, allow_unused=False, allow_nograd=True), engine)
    for allowed in (cls(model, 0.1, allow_unused=True), cls(model, 0.1, allow_nograd=True)):
        model.zero_grad(set_to_none=True)
        gradients = meta_gradient(allowed, engine)
        assert gradients["module.unused.weight"] is None
        assert gradients["module.unused.bias"] is None
        assert gradients["module.used.weight"] is not None


def test_unused_parameters_get_the_same_meta_gradient_on_every_engine() -> None:
    found = {}
    for engine in ENGINES:
        torch.manual_seed(0)
        found[engine] = meta_gradient(
            l2la.ADML(HalfUsed().double(), 0.1, allow_unused=True), engine
        )
    for name, reference in found["sequential"].items():
        actual = found["vmap"][name]
        assert (actual is None) == (reference is None), name
        if reference is not None and actual is not None:
            torch.testing.assert_close(actual, reference, rtol=1e-9, atol=1e-12)


def test_evaluation_follows_the_learners_switches() -> None:
    inputs, labels = tasks(1)[0].support_inputs, tasks(1)[0].support_labels
    with pytest.raises(RuntimeError, match="allow_nograd=True"):
        GradientLearner(l2la.ADML(frozen_model(), 0.1), lr=0.1, steps=2).adapt(inputs, labels)
    net = frozen_model()
    models = GradientLearner(l2la.ADML(net, 0.1, allow_nograd=True), lr=0.1, steps=2).adapt(
        inputs, labels
    )
    assert len(models) == 3 and net[0].weight.grad is None
    # a plain module: any parameter may be frozen or unused, as before
    assert len(GradientLearner(HalfUsed().double(), lr=0.1, steps=1).adapt(inputs, labels)) == 2
