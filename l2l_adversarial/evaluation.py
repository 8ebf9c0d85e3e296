"""The paper's meta-test protocol (Sec. 4.2): accuracy under clean and adversarial scenarios.

For every test task and attack radius eps, a meta-learned model is adapted on a support set
that is clean, 40% adversarial (only when shots > 1) or fully adversarial, and scored on a
clean and on an adversarial query set: the scenarios "Clean-Clean", "Clean-Adversarial",
"40%-Clean", "40%-Adversarial", "Adversarial-Clean" and "Adversarial-Adversarial" of
Tables 1-4. Each entry is the mean top-1 accuracy over the tasks with a 95% confidence
interval ``1.96 * std / sqrt(n)`` (population std, as MAML's reference evaluation code), in
percent. Query loss and accuracy are also recorded after every adaptation step 0..steps
(Figures 2-5).

Where adversarial samples come from (``protocol``):

* ``"paper"`` (default): support and query samples are attacked against the meta-learned
  initialisation theta, before any adaptation (the paper generates its meta-test samples
  with FGSM the same way as in meta-training, where Algorithm 1 attacks theta). The same
  adversarial query set is then scored after every adaptation step.
* ``"adapted"``: the support set is attacked against theta, the query set against the model
  that is scored (theta after k steps, for every step k): a white-box attack on the final
  classifier, as in Adversarial Querying (Goldblum et al.).

Any :class:`~l2l_adversarial.attacks.Attack` can be used (by default
:func:`~l2l_adversarial.attacks.paper_attack`, FGSM; ``functools.partial(PGD, steps=20)`` for
PGD). Attacks with a random start are seeded from
``(seed, task index)`` (:func:`~l2l_adversarial.transforms.derive_seed`), so the same tasks
and seed give identical results, and every method sees the same random starts.

The clean support adaptation is shared by every epsilon, and one adaptation serves both
query scenarios of a support scenario. Tasks run in chunks (``chunk_size``): each chunk's
values (finite inputs inside the attacks' data range, labels, balanced shots) are checked with
one host read and its results read with one; the next chunk of a thread-safe task source
(``tasks.thread_safe``: :class:`~l2l_adversarial.data.FewShotTasks` on an image table) is
built in a background thread meanwhile. Gradient-based learners run through the task runtime
(:mod:`l2l_adversarial.runtime`): task by task (``engine="sequential"``, the reference and
the default) or a whole chunk at once (``engine="vmap"``), the same protocol code either way;
other learners (Matching Networks) through their own models, task by task.

Under ``torchrun`` (``torch.distributed`` initialised), rank ``r`` evaluates tasks
``r, r + world_size, ...`` and the per-task results are gathered in task order, so every rank
returns the same :class:`EvaluationResult` as one process would: call it on every rank.

Example:
    >>> import torch
    >>> from l2l_adversarial import MLP, Task
    >>> from l2l_adversarial.evaluation import GradientLearner, evaluate
    >>> tasks = [Task(torch.rand(5, 8), torch.arange(5), torch.rand(15, 8),
    ...               torch.arange(5).repeat(3)) for _ in range(3)]
    >>> result = evaluate(GradientLearner(MLP(8, 5), lr=0.01, steps=10), tasks, method="MAML")
    >>> [s.scenario for s in result.scenarios][:4]
    ['Clean-Clean', 'Clean-Adversarial', 'Adversarial-Clean', 'Adversarial-Adversarial']
    >>> len(result.scenarios[0].accuracy_curve)  # after steps 0..10
    11
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import torch
from learn2learn.algorithms import MAML
from torch import Tensor, nn

from l2l_adversarial.algorithms.base import MetaLearner, check_step_size
from l2l_adversarial.algorithms.task_ops import SequentialOps, TaskOps
from l2l_adversarial.attacks import PIXEL_LEVEL, Attack, paper_attack, pixel_levels
from l2l_adversarial.data.prefetch import MetaBatches
from l2l_adversarial.distributed import gather_strided, rank_indices
from l2l_adversarial.functional import FunctionalModel, LossFn, Params, accuracy
from l2l_adversarial.runtime import SeededStarts, StackedOps, check_stackable, resolve_engine
from l2l_adversarial.runtime.layouts import explain_randomness
from l2l_adversarial.task import Task
from l2l_adversarial.transforms import (
    QUERY_STREAM,
    SUPPORT_STREAM,
    derive_seed,
    keep_adversarial_rows,
    seeded,
)
from l2l_adversarial.validation import (
    check_choice,
    check_meta_batch,
    check_task,
    check_task_metadata,
    value_checks,
)

Model = Callable[[Tensor], Tensor]

PROTOCOLS = ("paper", "adapted")
DEFAULT_EPSILONS = (2.0, 0.2)
"""The paper's meta-test radii, in 8-bit pixel levels (multiplied by ``pixel_scale``)."""
DEFAULT_NUM_TASKS = 600
"""Number of test tasks the paper averages over."""
Z_95 = 1.96
DEFAULT_CHUNK_SIZE = 20
"""Tasks per chunk: stacked at once by the vmap engine, checked and read at once by both."""

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_EPSILONS",
    "DEFAULT_NUM_TASKS",
    "PIXEL_LEVEL",
    "PROTOCOLS",
    "EvaluationResult",
    "FewShotLearner",
    "GradientLearner",
    "Scenario",
    "ScenarioResult",
    "confidence_interval",
    "evaluate",
    "few_shot_learner",
    "paper_scenarios",
]


class FewShotLearner(ABC):
    """A meta-learned few-shot classifier as the evaluation sees it.

    Adaptation returns the models to score rather than their predictions, so the evaluation
    can also attack the model that is scored (``protocol="adapted"``). A model is any callable
    mapping a batch of inputs to logits (or log-probabilities) that leaves the learner
    unchanged. A learner whose adaptation is conditioning on the support set (Matching
    Networks) returns one conditioned model: its curves have a single point.
    """

    @abstractmethod
    def initial_model(self, support_inputs: Tensor, support_labels: Tensor) -> Model:
        """The model attacked before adaptation (theta), given the clean support set.

        Gradient-based learners ignore the support set; learners whose predictions depend on
        it (Matching Networks) condition on it.
        """

    @abstractmethod
    def adapt(self, support_inputs: Tensor, support_labels: Tensor) -> list[Model]:
        """The models after each adaptation step on the support set, step 0 first."""

    def query_layout(self, query_inputs: Tensor) -> Tensor:
        """The query set in the memory format its passes run fastest in (same values)."""
        return query_inputs


class GradientLearner(FewShotLearner):
    """Meta-test adaptation of MAML, MAML-AD, ADML and AQ: plain SGD from theta.

    ``steps`` gradient steps of size ``lr`` on the support loss (the paper: 10 steps of 0.01),
    first order (no graph is kept); :meth:`adapt` returns the model at theta and after every
    step. theta is read from ``model`` on every call and never written.

    Args:
        model: the meta-learned network: an ``nn.Module``, a learn2learn ``MAML`` (ADML,
            MAMLAD, AdversarialQuerying included; the wrapped module is used, after the
            learner's ``features`` if it has them) or a
            :class:`~l2l_adversarial.functional.FunctionalModel`.
        lr: adaptation step size.
        steps: number of adaptation steps (0: score theta itself).
        loss_fn: adaptation loss; default: that of ``model`` if it has one, else cross-entropy.

    Example:
        >>> from l2l_adversarial import CNN4
        >>> learner = GradientLearner(CNN4(ways=5, image_size=32), lr=0.01, steps=10)
        >>> models = learner.adapt(torch.rand(5, 3, 32, 32), torch.arange(5))
        >>> len(models), models[-1](torch.rand(2, 3, 32, 32)).shape
        (11, torch.Size([2, 5]))
    """

    def __init__(
        self,
        model: nn.Module | FunctionalModel,
        lr: float = 0.01,
        steps: int = 10,
        *,
        loss_fn: LossFn | None = None,
    ) -> None:
        functional = model.functional if isinstance(model, MetaLearner) else model
        if isinstance(functional, FunctionalModel):  # features (ANIL) kept
            self.functional = functional
            if loss_fn is not None:
                self.functional = FunctionalModel(
                    functional.module, loss_fn, features=functional.features
                )
        elif isinstance(model, MAML):
            self.functional = FunctionalModel(model.module, loss_fn)
        elif isinstance(model, nn.Module):
            self.functional = FunctionalModel(model, loss_fn)
        else:
            raise TypeError(
                "model must be an nn.Module, a learn2learn MAML (ADML, MAMLAD, ...) or a "
                f"FunctionalModel, got {type(model).__name__}"
            )
        # learn2learn's switches where the model is a MAML (frozen parameters and parameters
        # the support loss does not use: errors unless allowed); any parameter may be frozen
        # or unused otherwise
        self.allow_unused = bool(getattr(model, "allow_unused", True))
        self.allow_nograd = bool(getattr(model, "allow_nograd", True))
        self.lr = check_step_size("lr", lr)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an integer >= 0 (the paper: 10), got {steps!r}")
        self.steps = steps

    def __repr__(self) -> str:
        return f"GradientLearner(lr={self.lr:g}, steps={self.steps})"

    first_order = True  # meta-testing keeps no graph
    attack: Attack | None = None

    def attack_for(self, query: bool) -> None:
        """None: meta-testing names the attack of every call."""
        return None

    def theta(self) -> Params:
        """The meta-learned parameters, detached."""
        return {name: p.detach() for name, p in self.functional.parameters().items()}

    meta_parameters = theta  # what the task runtime's operations start from

    def initial_model(self, support_inputs: Tensor, support_labels: Tensor) -> Model:
        return self.functional.at(self.theta())

    def query_layout(self, query_inputs: Tensor) -> Tensor:
        """Channels-last when the meta-learner was built with ``channels_last=True``."""
        return self.functional.query_layout(query_inputs)

    def adapt(self, support_inputs: Tensor, support_labels: Tensor) -> list[Model]:
        if self.steps:
            self.functional.check_adaptable(self.allow_nograd, repr(self))
        with torch.no_grad():
            stepped = self.functional.trajectory(
                self.theta(), support_inputs, support_labels, self.lr, self.steps,
                allow_unused=self.allow_unused,
            )  # fmt: skip
        return [self.functional.at(params) for params in [self.theta(), *stepped]]


class Conditioned(Protocol):
    """A learner whose adaptation is conditioning on the support set (Matching Networks):
    ``support_model(support, labels)`` classifies support samples in the clean support set's
    context, ``query_model(support, labels)`` classifies queries given a support set."""

    def support_model(self, support_inputs: Tensor, support_labels: Tensor) -> Model: ...

    def query_model(self, support_inputs: Tensor, support_labels: Tensor) -> Model: ...


class MatchingLearner(FewShotLearner):
    """A :class:`Conditioned` learner at meta-test (Matching Networks): adaptation is
    conditioning on the support set.

    The support set is attacked as queries classified against the clean support set
    (``support_model``); the curves have one point.

    Example:
        >>> from l2l_adversarial import MatchingNetwork
        >>> learner = MatchingLearner(MatchingNetwork(ways=5, image_size=32, fce=False))
        >>> len(learner.adapt(torch.rand(5, 3, 32, 32), torch.arange(5)))
        1
    """

    def __init__(self, network: Conditioned) -> None:
        self.network = network

    def __repr__(self) -> str:
        return f"MatchingLearner(fce={getattr(self.network, 'fce', None)})"

    def initial_model(self, support_inputs: Tensor, support_labels: Tensor) -> Model:
        return self.network.support_model(support_inputs, support_labels)

    def adapt(self, support_inputs: Tensor, support_labels: Tensor) -> list[Model]:
        return [self.network.query_model(support_inputs, support_labels)]


def few_shot_learner(learner: nn.Module, lr: float, steps: int) -> FewShotLearner:
    """How a meta-trained learner adapts at meta-test: SGD from theta (``lr``, ``steps``), or
    conditioning on the support set for :class:`Conditioned` learners (Matching Networks)."""
    if callable(getattr(learner, "query_model", None)):
        return MatchingLearner(cast(Conditioned, learner))
    return GradientLearner(learner, lr=lr, steps=steps)


def _fraction_label(fraction: float) -> str:
    if fraction == 0:
        return "clean"
    if fraction == 1:
        return "adversarial"
    return f"{100 * fraction:g}%"


@dataclass(frozen=True)
class Scenario:
    """A meta-test scenario: fractions of adversarial support and query samples per class.

    Example:
        >>> Scenario(0.4, 1.0).name, Scenario(0.4, 1.0).support, Scenario(0.4, 1.0).query
        ('40%-Adversarial', '40%', 'adversarial')
    """

    support_fraction: float
    query_fraction: float

    @property
    def support(self) -> str:
        """The support label of the paper's tables: "clean", "40%" or "adversarial"."""
        return _fraction_label(self.support_fraction)

    @property
    def query(self) -> str:
        """The query label of the paper's tables: "clean" or "adversarial"."""
        return _fraction_label(self.query_fraction)

    @property
    def name(self) -> str:
        """E.g. ``"Clean-Adversarial"`` (support scenario - query scenario)."""
        return f"{self.support.capitalize()}-{self.query.capitalize()}"


def paper_scenarios(shots: int) -> list[Scenario]:
    """The scenarios of Tables 1-4, in table order; the 40% rows only when ``shots > 1``.

    Example:
        >>> [s.name for s in paper_scenarios(1)]
        ['Clean-Clean', 'Clean-Adversarial', 'Adversarial-Clean', 'Adversarial-Adversarial']
    """
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be an integer >= 1, got {shots!r}")
    supports = (0.0, 0.4, 1.0) if shots > 1 else (0.0, 1.0)
    return [Scenario(s, q) for s in supports for q in (0.0, 1.0)]


def confidence_interval(values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean and 95% confidence half-width ``1.96 * std / sqrt(n)`` (population std).

    Example:
        >>> mean, ci = confidence_interval([20.0, 40.0, 60.0, 80.0])
        >>> round(mean, 3), round(ci, 3)
        (50.0, 21.913)
    """
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {array.shape}")
    return float(array.mean()), float(Z_95 * array.std() / math.sqrt(array.size))


def _has_type(value: Any, hint: Any) -> bool:
    """Whether ``value`` (read from JSON) is of the annotated type ``hint``: a float field
    takes an int too, neither takes a bool."""
    if isinstance(hint, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if hint is float:
        hint = int | float
    return isinstance(value, hint) and not (isinstance(value, bool) and hint is not bool)


_TYPE_NAMES = {float: "a number", int: "an integer", str: "a string"}


def _check_field_types(cls: type, fields: Mapping[str, Any], prefix: str = "") -> None:
    """Raise ``TypeError`` naming the first of ``fields`` that is not of its annotated type."""
    hints = typing.get_type_hints(cls)
    for name, value in fields.items() if isinstance(fields, Mapping) else ():
        if name in hints and name != "scenarios" and not _has_type(value, hints[name]):
            expected = _TYPE_NAMES.get(hints[name], hints[name])
            raise TypeError(f"{prefix}{name} is {value!r}, not {expected}")


@dataclass
class ScenarioResult:
    """One table entry and its curves. Accuracies are in percent.

    ``accuracy``/``ci95``/``loss`` are after the last adaptation step; ``accuracy_curve`` and
    ``loss_curve`` hold the task means after every step 0..steps; ``task_accuracies`` the
    final accuracy of every task, in task order.
    """

    support: str
    query: str
    epsilon: float
    accuracy: float
    ci95: float
    loss: float
    accuracy_curve: list[float]
    loss_curve: list[float]
    task_accuracies: list[float]

    @property
    def scenario(self) -> str:
        """E.g. ``"40%-Adversarial"``."""
        return f"{self.support.capitalize()}-{self.query.capitalize()}"


@dataclass
class EvaluationResult:
    """All scenarios of one method, JSON-serialisable with :meth:`to_dict`/:meth:`from_dict`.

    ``epsilon`` of a scenario is in 8-bit pixel levels (the paper's units); the attacks ran
    with ``epsilon * pixel_scale``. ``attacks`` holds the attack of every epsilon.
    """

    method: str
    ways: int
    shots: int
    num_tasks: int
    protocol: str
    seed: int
    learner: str
    pixel_scale: float
    attacks: list[str]
    dataset: str | None
    scenarios: list[ScenarioResult]
    training_seed: int | None = None
    """The seed the evaluated learner was meta-trained with (``None``: not recorded)."""
    engine: str = "sequential"
    """The engine that ran the tasks, ``"sequential"`` or ``"vmap"`` (``evaluate``'s resolved)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionaries, lists and numbers (``json.dumps`` ready)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvaluationResult:
        """Inverse of :meth:`to_dict`; a value of the wrong type is refused naming its field.

        >>> EvaluationResult.from_dict({"scenarios": [{"accuracy": "abc"}]})
        Traceback (most recent call last):
        ValueError: not an EvaluationResult dictionary (scenarios[0].accuracy is 'abc', not a number); expected the output of EvaluationResult.to_dict()
        """
        try:
            fields = dict(data)
            entries = fields["scenarios"]
            for index, entry in enumerate(entries if isinstance(entries, list) else []):
                _check_field_types(ScenarioResult, entry, f"scenarios[{index}].")
            _check_field_types(cls, fields)
            fields["scenarios"] = [ScenarioResult(**entry) for entry in fields["scenarios"]]
            return cls(**fields)
        except (TypeError, KeyError) as error:
            raise ValueError(
                f"not an EvaluationResult dictionary ({error}); expected the output of "
                "EvaluationResult.to_dict()"
            ) from error

    def find(self, support: str, query: str, epsilon: float) -> ScenarioResult | None:
        """The entry for ``support`` ("clean", "40%", "adversarial"), ``query`` and epsilon."""
        for entry in self.scenarios:
            if (
                entry.support == support
                and entry.query == query
                and math.isclose(entry.epsilon, epsilon, rel_tol=1e-9, abs_tol=1e-12)
            ):
                return entry
        return None


class SupportsUpdate(Protocol):
    """A progress bar such as ``tqdm.tqdm``: ``update(1)`` after every task."""

    def update(self, n: int = 1) -> object: ...


def evaluate(
    learner: FewShotLearner,
    tasks: Sequence[Task],
    *,
    method: str,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    make_attack: Callable[[float], Attack] = paper_attack,
    pixel_scale: float = PIXEL_LEVEL,
    protocol: str = "paper",
    scenarios: Sequence[Scenario] | None = None,
    seed: int = 0,
    dataset: str | None = None,
    device: torch.device | str | None = None,
    progress: SupportsUpdate | None = None,
    engine: str = "auto",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    curves: bool = True,
) -> EvaluationResult:
    """Evaluate ``learner`` on ``tasks`` in every scenario at every epsilon.

    Args:
        learner: the method, e.g. ``GradientLearner(model, lr=0.01, steps=10)``.
        tasks: the test tasks, the same for every method (all with the same ways and shots).
        method: name shown in reports: "MAML", "MAML-AD", "ADML", "Matching Nets", "AQ", ...
        epsilons: attack radii in 8-bit pixel levels (the paper: 2 and 0.2), attacked with
            ``make_attack(epsilon * pixel_scale)``: ``FGSM`` (the paper),
            ``functools.partial(PGD, steps=20)``, ...; ``pixel_scale`` 1/255 for [0, 1].
        protocol: ``"paper"`` (all attacks against theta) or ``"adapted"`` (query attacked
            against the scored, adapted model); see the module docstring.
        scenarios: default :func:`paper_scenarios` for the tasks' shots.
        seed: seeds attacks with a random start, per task: ``derive_seed(seed, index)``.
        dataset, device: recorded for the report; where every task is moved (the model's).
        progress: e.g. ``tqdm.tqdm(total=len(tasks))``, updated with the tasks this process
            evaluated after every chunk.
        engine: ``"sequential"`` (task by task, any learner: the reference), ``"vmap"``
            (experimental: a chunk at once, gradient-based learners; the same results in
            float64, in float32 up to the sign of near-zero attack gradients) or ``"auto"``
            (``"sequential"``; :mod:`l2l_adversarial.runtime`).
        chunk_size: tasks per chunk: the vmap engine's batch (bounds memory); for both
            engines the tasks whose values are checked, and results read, at once.
        curves: score (under ``"adapted"``: attack) the model after every step; ``False``:
            the last only, the same table entries with one attack instead of ``steps + 1``.
    """
    _check_arguments(learner, tasks, method, epsilons, pixel_scale, protocol, seed, chunk_size)
    engine = resolve_engine(learner, engine)
    ways, shots, scenarios = _setting(tasks[0], scenarios)
    epsilons = [float(e) for e in epsilons]
    attacks = _attacks(make_attack, epsilons, pixel_scale)
    run = _Protocol(attacks, scenarios, protocol, ways, shots, all_steps=bool(curves))
    per_task = run.run(learner, tasks, engine, seed, chunk_size, device, progress)
    return EvaluationResult(
        method=method, ways=ways, shots=shots, num_tasks=len(tasks), protocol=protocol,
        seed=seed, learner=repr(learner), pixel_scale=float(pixel_scale),
        attacks=[repr(a) for a in attacks], dataset=dataset,
        scenarios=_results(per_task, epsilons, scenarios), engine=engine,
    )  # fmt: skip


def _check_arguments(
    learner: FewShotLearner,
    tasks: Sequence[Task],
    method: str,
    epsilons: Sequence[float],
    pixel_scale: float,
    protocol: str,
    seed: int,
    chunk_size: int,
) -> None:
    check_choice("protocol", protocol, PROTOCOLS)
    if not isinstance(learner, FewShotLearner):
        raise TypeError(
            "learner must be a FewShotLearner (e.g. GradientLearner(model, lr=0.01, steps=10)), "
            f"got {type(learner).__name__}"
        )
    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a non-empty name such as 'ADML', got {method!r}")
    if len(tasks) == 0:
        raise ValueError("tasks is empty: pass the list of test tasks to evaluate on")
    values = [float(e) for e in epsilons]
    if not values or not all(math.isfinite(e) and e >= 0 for e in values):
        raise ValueError(f"epsilons must be a non-empty list of numbers >= 0, got {values}")
    if not (math.isfinite(pixel_scale) and pixel_scale > 0):
        raise ValueError(f"pixel_scale must be a number > 0 (1/255 for [0, 1]), got {pixel_scale}")
    derive_seed(seed)  # validates
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")


def _attacks(
    make_attack: Callable[[float], Attack], epsilons: Sequence[float], pixel_scale: float
) -> list[Attack]:
    attacks = [make_attack(pixel_levels(e, pixel_scale)) for e in epsilons]
    for attack in attacks:
        if not isinstance(attack, Attack):
            raise TypeError(
                f"make_attack must return an l2l_adversarial Attack, got {type(attack).__name__}"
            )
    return attacks


def _results(
    per_task: Sequence[Curves], epsilons: Sequence[float], scenarios: Sequence[Scenario]
) -> list[ScenarioResult]:
    """The table entries and curves from every task's curves."""
    results = []
    for e, epsilon in enumerate(epsilons):
        for scenario in scenarios:
            losses = np.array([curves[e, scenario][0] for curves in per_task], dtype=np.float64)
            accuracies = 100 * np.array(
                [curves[e, scenario][1] for curves in per_task], dtype=np.float64
            )
            mean, ci95 = confidence_interval(accuracies[:, -1])
            results.append(
                ScenarioResult(
                    support=scenario.support,
                    query=scenario.query,
                    epsilon=epsilon,
                    accuracy=mean,
                    ci95=ci95,
                    loss=float(losses[:, -1].mean()),
                    accuracy_curve=accuracies.mean(axis=0).tolist(),
                    loss_curve=losses.mean(axis=0).tolist(),
                    task_accuracies=accuracies[:, -1].tolist(),
                )
            )
    return results


Curves = dict[tuple[int, Scenario], tuple[list[float], list[float]]]
"""Per (epsilon index, scenario): a task's query losses and accuracies after every step."""


def _setting(task: Task, scenarios: Sequence[Scenario] | None) -> tuple[int, int, list[Scenario]]:
    """(ways, shots) of the first task, with one host read (the chunks' value checks then
    hold every task, this one included, to them), and the scenarios (default: the paper's)."""
    if not isinstance(task, tuple) or len(task) != 4:
        raise TypeError(f"tasks[0] must be a Task, got {type(task).__name__}")
    check_task_metadata(task, where="tasks[0]")
    labels = task.support_labels.tolist()
    counts = Counter(labels)
    ways = len(counts)
    if sorted(counts) != list(range(ways)):
        raise ValueError(
            f"tasks[0] has support labels {sorted(counts)}: relabel each task's classes "
            "0..ways-1 (learn2learn's RemapLabels transform does this)"
        )
    if len(set(counts.values())) != 1:
        raise ValueError(
            f"tasks[0] has {[counts[c] for c in range(ways)]} support samples per class: the "
            "evaluation needs the same number of shots for every class"
        )
    scenarios = list(paper_scenarios(counts[0]) if scenarios is None else scenarios)
    if not scenarios:
        raise ValueError("scenarios is empty: leave it None for the paper's scenarios")
    return ways, counts[0], scenarios


def _check_chunk(
    chunk: Sequence[Task],
    indices: Sequence[int],
    ways: int,
    shots: int,
    attacks: Sequence[Attack],
    engine: str,
    model: nn.Module | None = None,
) -> list[Task]:
    """Metadata of every task (against ``model``, a gradient-based learner's network), then
    its values with one host read (see :func:`evaluate`); returns the tasks with integer
    labels as ``torch.long``."""
    names = [f"tasks[{index}]" for index in indices]
    checked = []
    for name, task in zip(names, chunk, strict=True):
        if not isinstance(task, tuple) or len(task) != 4:
            raise TypeError(f"{name} must be a Task, got {type(task).__name__}")
        task = check_task_metadata(task, model=model, where=name)
        checked.append(task)
        if task.support_labels.shape[0] != ways * shots:  # (an error: reading is fine)
            other = check_task(*task)
            raise ValueError(
                f"{name} is {other}-way {task.support_labels.shape[0] / other:g}-shot but "
                f"tasks[0] is {ways}-way {shots}-shot: evaluate each setting separately"
            )
    if engine == "vmap":
        check_stackable(checked, names)
    data_range = attacks[0].input_range
    check_meta_batch(checked, data_range=data_range, shots=shots, names=names)
    return checked


def _read(found: Sequence[Mapping[tuple[int, Scenario], tuple[Tensor, Tensor]]]) -> list[Curves]:
    """The tasks' curves on the host, with one read for all of them."""
    tensors = [t for curves in found for pair in curves.values() for t in pair]
    values = torch.cat([t.detach().reshape(-1).double() for t in tensors]).tolist()
    read: list[Curves] = []
    position = 0
    for curves in found:
        task: Curves = {}
        for key, (losses, _) in curves.items():
            size = losses.numel()
            task[key] = (
                values[position : position + size],
                values[position + size : position + 2 * size],
            )
            position += 2 * size
        read.append(task)
    return read


class _EvaluationOps(Protocol):
    """What the meta-test protocol does to one task or a stack of tasks; models are opaque
    to it."""

    def initial_model(self, inputs: Tensor, labels: Tensor) -> Any: ...

    def adapt(self, inputs: Tensor, labels: Tensor) -> list[Any]: ...

    def perturb(
        self, attack: Attack, model: Any, inputs: Tensor, labels: Tensor, stream: tuple[int, ...]
    ) -> Tensor: ...

    def score(self, model: Any, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]: ...


@dataclass
class _Protocol:
    """The meta-test protocol of Sec. 4.2 for some attacks and scenarios."""

    attacks: Sequence[Attack]
    scenarios: Sequence[Scenario]
    protocol: str
    ways: int
    shots: int
    all_steps: bool = True
    """Score the model after every adaptation step; ``False``: the last one only."""

    def run(
        self,
        learner: FewShotLearner,
        tasks: Sequence[Task],
        engine: str,
        seed: int,
        chunk_size: int,
        device: torch.device | str | None,
        progress: SupportsUpdate | None,
    ) -> list[Curves]:
        """Every task's curves, in task order (gathered from every rank under torchrun), on
        ``device`` (default: where the first task is)."""
        device = torch.device(device) if device is not None else tasks[0].support_inputs.device
        mine = list(rank_indices(len(tasks)))
        chunks = [mine[start : start + chunk_size] for start in range(0, len(mine), chunk_size)]
        prefetch = 2 if getattr(tasks, "thread_safe", False) else 0
        per_rank: list[Curves] = []
        functional = getattr(learner, "functional", None)
        model = functional.network if isinstance(functional, FunctionalModel) else None
        with MetaBatches(
            tasks, chunks.__getitem__, 0, len(chunks), device=device, prefetch=prefetch
        ) as batches:
            for batch in batches:
                indices, chunk = [index for index, _ in batch], [task for _, task in batch]
                chunk = _check_chunk(
                    chunk, indices, self.ways, self.shots, self.attacks, engine, model
                )
                seeds = [derive_seed(seed, index) for index in indices]
                with value_checks(False):
                    found = self._chunk_curves(learner, chunk, seeds, engine)
                per_rank += _read(found)  # the chunk's one host read of results
                if progress is not None:
                    progress.update(len(chunk))
        per_task = gather_strided(per_rank, len(tasks))
        lengths = {len(curves[key][0]) for curves in per_task for key in curves}
        if len(lengths) != 1:
            raise ValueError(
                f"{learner!r}.adapt returned {sorted(lengths)} models for different support "
                "sets: every adaptation must return the same number of steps"
            )
        return per_task

    def _chunk_curves(
        self, learner: FewShotLearner, chunk: list[Task], seeds: list[int], engine: str
    ) -> list[dict[tuple[int, Scenario], tuple[Tensor, Tensor]]]:
        """The curves of a chunk: stacked (vmap) or task by task, through the task runtime's
        operations for gradient-based learners, through the learner's own models otherwise."""
        if engine == "vmap":
            assert isinstance(learner, GradientLearner)
            stack = Task(*(torch.stack(list(sets)) for sets in zip(*chunk, strict=True)))
            stacked = _RuntimeOps(StackedOps(learner, starts=SeededStarts(seeds)), learner)
            with explain_randomness(learner.functional.network):
                curves = self.curves(stacked, stack)
            return [
                {key: (v[0][t], v[1][t]) for key, v in curves.items()} for t in range(len(chunk))
            ]
        found = []
        for task, task_seed in zip(chunk, seeds, strict=True):
            if isinstance(learner, GradientLearner):
                ops: _EvaluationOps = _RuntimeOps(
                    SequentialOps(learner, starts=SeededStarts([task_seed])),
                    learner,
                )
            else:
                ops = _LearnersModels(learner, task_seed)
            found.append(self.curves(ops, task))
        return found

    def curves(
        self, ops: _EvaluationOps, task: Task
    ) -> dict[tuple[int, Scenario], tuple[Tensor, Tensor]]:
        """Per (epsilon index, scenario): the query losses and accuracies after every
        adaptation step (last dimension) of one task or a stack, on the device."""
        support_x, support_y, query_x, query_y = task
        initial = ops.initial_model(support_x, support_y)
        by_support: dict[float, list[Scenario]] = {}
        for scenario in self.scenarios:
            by_support.setdefault(scenario.support_fraction, []).append(scenario)

        def attacked(attack: Attack, model: Any, x: Tensor, y: Tensor, fraction: float,
                     stream: tuple[int, ...]) -> Tensor:  # fmt: skip
            if fraction == 0:
                return x
            return keep_adversarial_rows(y, fraction, ops.perturb(attack, model, x, y, stream), x)

        clean_models = ops.adapt(support_x, support_y) if 0.0 in by_support else []
        curves = {}
        for e, attack in enumerate(self.attacks):
            initial_queries: dict[float, Tensor] = {}  # "paper" protocol: one query set per eps
            for support_fraction, group in by_support.items():
                models = clean_models
                if support_fraction > 0:
                    support = attacked(
                        attack, initial, support_x, support_y, support_fraction, (SUPPORT_STREAM,)
                    )
                    models = ops.adapt(support, support_y)
                first = 0 if self.all_steps else len(models) - 1  # the stream keys stay
                for scenario in group:
                    fraction, losses, accuracies = scenario.query_fraction, [], []
                    for step, model in enumerate(models[first:], start=first):
                        if self.protocol == "adapted":
                            query = attacked(
                                attack, model, query_x, query_y, fraction, (QUERY_STREAM, step)
                            )
                        elif fraction not in initial_queries:
                            query = initial_queries[fraction] = attacked(
                                attack, initial, query_x, query_y, fraction, (QUERY_STREAM, 0)
                            )
                        else:
                            query = initial_queries[fraction]
                        loss, accuracy_ = ops.score(model, query, query_y)
                        losses.append(loss)
                        accuracies.append(accuracy_)
                    curves[e, scenario] = (torch.stack(losses, -1), torch.stack(accuracies, -1))
        return curves


class _LearnersModels:
    """One task through a :class:`FewShotLearner`'s own models (any learner)."""

    def __init__(self, learner: FewShotLearner, task_seed: int) -> None:
        self.learner, self.task_seed = learner, task_seed

    def initial_model(self, inputs: Tensor, labels: Tensor) -> Model:
        return self.learner.initial_model(inputs, labels)

    def adapt(self, inputs: Tensor, labels: Tensor) -> list[Model]:
        models = self.learner.adapt(inputs, labels)
        if not models:
            raise ValueError(f"{self.learner!r}.adapt returned no model to score")
        return models

    def perturb(
        self, attack: Attack, model: Model, inputs: Tensor, labels: Tensor, stream: tuple[int, ...]
    ) -> Tensor:
        if stream[0] == QUERY_STREAM:
            inputs = self.learner.query_layout(inputs)
        return seeded(attack, derive_seed(self.task_seed, *stream))(model, inputs, labels)

    @torch.no_grad()
    def score(self, model: Model, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        logits = model(self.learner.query_layout(inputs))
        return nn.functional.cross_entropy(logits, labels), accuracy(logits, labels)


class _RuntimeOps:
    """A gradient-based learner through the task runtime's operations, on one task
    (:class:`~l2l_adversarial.algorithms.task_ops.SequentialOps`) or a stack
    (:class:`~l2l_adversarial.runtime.stacked_ops.StackedOps`); a model is its parameters
    (``None``: theta)."""

    def __init__(self, ops: TaskOps, learner: GradientLearner) -> None:
        self.ops, self.lr, self.steps = ops, learner.lr, learner.steps

    def initial_model(self, inputs: Tensor, labels: Tensor) -> None:
        return None

    @torch.no_grad()
    def adapt(self, inputs: Tensor, labels: Tensor) -> list[Params | None]:
        return [None, *self.ops.adapt([(inputs, labels, self.lr)], self.steps, trajectory=True)]

    def perturb(
        self,
        attack: Attack,
        model: Params | None,
        inputs: Tensor,
        labels: Tensor,
        stream: tuple[int, ...],
    ) -> Tensor:
        query = stream[0] == QUERY_STREAM
        (adversarial,) = self.ops.perturb([(inputs, labels, query)], model, attack, stream)
        return adversarial

    @torch.no_grad()
    def score(self, model: Params | None, inputs: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        (objective,) = self.ops.score([(model, inputs, labels)])
        return objective.loss, objective.accuracy
