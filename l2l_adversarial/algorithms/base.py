"""What MAML, ADML, MAML-AD and Adversarial Querying share: a learn2learn ``MAML`` wrapper with
a functional inner loop and one per-task objective, and the options they all take."""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import torch
from learn2learn.algorithms import MAML
from torch import Tensor, nn
from typing_extensions import TypedDict

from l2l_adversarial.algorithms.robust import DEFAULT_TRADES_BETA, RobustLoss, RobustOptions
from l2l_adversarial.algorithms.task_ops import Objective, SequentialOps, TaskOps
from l2l_adversarial.attacks import FGSM, Attack
from l2l_adversarial.functional import FunctionalModel, LossFn, Params
from l2l_adversarial.task import Task
from l2l_adversarial.validation import (
    check_choice,
    check_task,
    check_task_metadata,
    is_classification_loss,
)

DEFAULT_TRAINING_EPS = 2 / 255
"""The paper's meta-training FGSM radius, eps = 2 on 8-bit images scaled to [0, 1]."""

ATTACK_SETS = ("support", "query", "both")
"""Which sets meta-training attacks: the support sets (the inner loops' data), the query
sets (the meta-objective's), or both."""
ATTACK_TARGETS = ("initial", "adapted")
"""Which parameters the query sets are attacked against: theta (``"initial"``) or the task's
adapted parameters (``"adapted"``). Support sets are attacked before any inner loop, against
theta."""


class LearnerOptions(TypedDict, total=False):
    """Keywords every gradient-based learner takes.

    Attributes:
        adaptation_steps: inner gradient steps per task (the paper: 5 in meta-training).
        loss_fn: task loss ``loss_fn(outputs, targets)``; cross-entropy by default. Any
            differentiable loss works (e.g. ``mse_loss`` with float targets of the outputs'
            shape: other shapes, which torch would broadcast, are refused);
            class-label checks and accuracy apply to classification losses only.
        channels_last: evaluate (and attack) query sets in channels-last memory format, as
            :class:`~l2l_adversarial.functional.FunctionalModel` describes: same results,
            faster on the CPU; the model must not ``.view()`` its activations.
        features: a feature extractor before ``model`` (learn2learn's ANIL examples: the
            learner wraps the head, ``features`` stay outside). Attacks and query scores see
            ``model(features(x))`` on raw inputs; the inner loop adapts ``model``'s
            parameters only (the features run once per set, shared by every task and clone);
            the meta-gradient reaches both. The features are not a submodule of the learner:
            ``learner.parameters()`` are ``model``'s, as for learn2learn's ``MAML(head)``, so
            optimise ``list(features.parameters()) + list(learner.parameters())`` and move
            or switch the features (``.to()``, ``.train()``, ``.eval()``) yourself, as ANIL
            does.
    """

    adaptation_steps: int
    loss_fn: LossFn | None
    channels_last: bool
    features: nn.Module | None


class PlacementOptions(TypedDict, total=False):
    """Where meta-training attacks, for the learners where it means something (each
    learner's ``published_placement`` is its default, ``placement_sets`` what it takes).

    Attributes:
        attack_sets: :data:`ATTACK_SETS`: ``"support"``, ``"query"`` or ``"both"``.
        attack_target: :data:`ATTACK_TARGETS`: ``"initial"`` (theta) or ``"adapted"``.
    """

    attack_sets: str
    attack_target: str


class AdversarialOptions(LearnerOptions, RobustOptions, PlacementOptions, total=False):
    """:class:`LearnerOptions` plus ``attack``: an :class:`~l2l_adversarial.attacks.Attack`
    (default ``FGSM(eps=2/255)``), the robustness term's ``robust_loss`` and ``trades_beta``
    (:class:`~l2l_adversarial.algorithms.robust.RobustOptions`) and the attack's placement,
    ``attack_sets`` and ``attack_target`` (:class:`PlacementOptions`)."""

    attack: Attack | None


def check_step_size(name: str, value: float) -> float:
    """A learning rate must be a finite positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (the paper uses 0.01), got {value}")
    return float(value)


def check_flag(name: str, value: object) -> bool:
    """A learn2learn switch (``allow_unused``, ``allow_nograd``): ``True`` or ``False`` (``0``
    and ``1``, NumPy booleans too)."""
    if isinstance(value, bool):
        return value
    numpy_bool = type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")
    if (isinstance(value, int) and value in (0, 1)) or numpy_bool:
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r}")


def check_steps(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class MetaLearner(MAML):
    """A ``learn2learn.algorithms.MAML`` with a functional inner loop and one per-task objective.

    ``clone()`` and ``adapt()`` behave exactly as in learn2learn, so an unchanged MAML loop
    still runs. Subclasses define :meth:`task_objective`, the meta-objective of one task in
    terms of :class:`~l2l_adversarial.algorithms.task_ops.TaskOps`; ``meta_loss`` and
    ``loss_and_accuracy`` call it, and the task runtime (:func:`l2l_adversarial.engines.meta_step`)
    runs it over a meta-batch, task by task or batched.

    Args:
        model: the network; any ``nn.Module`` with trainable parameters.
        lr: inner-loop step size (alpha).
        first_order: drop second-order terms of the meta-gradient (FOMAML).
        allow_unused: as in learn2learn, whether a trainable parameter that the support loss
            does not use may be adapted: it then gets no gradient and keeps its value; without
            it the inner loop raises ``RuntimeError`` naming the parameter. Defaults to
            ``allow_nograd``.
        allow_nograd: as in learn2learn, whether the model may hold frozen parameters
            (``requires_grad=False``): they then stay as they are and get no gradient; without
            it the inner loop raises ``RuntimeError`` naming them.
        **options: :class:`LearnerOptions`.

    Both switches hold on every path: learn2learn's ``clone()``/``adapt()``, ``meta_loss``
    and the task runtime's engines (sequential and batched).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        first_order: bool = False,
        allow_unused: bool | None = None,
        allow_nograd: bool = False,
        **options: Any,
    ) -> None:
        own = {
            k: options.pop(k) for k in list(options) if k not in LearnerOptions.__optional_keys__
        }
        self._check_keywords(own)
        functional = FunctionalModel(
            model,
            options.get("loss_fn"),
            options.get("channels_last", False),
            options.get("features"),
        )
        allow_nograd = check_flag("allow_nograd", allow_nograd)
        if allow_unused is not None:
            allow_unused = check_flag("allow_unused", allow_unused)
        super().__init__(  # learn2learn's default: allow_unused = allow_nograd
            model,
            lr=check_step_size("lr", lr),
            first_order=bool(first_order),
            allow_unused=allow_unused,
            allow_nograd=allow_nograd,
        )
        self.adaptation_steps = check_steps("adaptation_steps", options.get("adaptation_steps", 1))
        self.functional = functional
        self.configure(**own)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """The signature a subclass shows (``help``, ``inspect``): learn2learn's arguments,
        its own keywords (every :meth:`configure` up the hierarchy) and ``**options``."""
        super().__init_subclass__(**kwargs)
        init = inspect.signature(MetaLearner.__init__).parameters.values()
        learn2learn = [p for p in init if p.kind is p.POSITIONAL_OR_KEYWORD][1:]  # not self
        options = [p for p in init if p.kind is p.VAR_KEYWORD]
        cls.__signature__ = inspect.Signature([*learn2learn, *cls._own_keywords(), *options])

    @classmethod
    def _own_keywords(cls) -> list[inspect.Parameter]:
        """The keyword-only parameters of every :meth:`configure` in the class hierarchy."""
        return [
            parameter
            for klass in cls.__mro__
            if "configure" in vars(klass)
            for parameter in inspect.signature(vars(klass)["configure"]).parameters.values()
            if parameter.kind is parameter.KEYWORD_ONLY
        ]

    def _check_keywords(self, own: dict[str, Any]) -> None:
        accepted = [p.name for p in self._own_keywords()]
        for name in own:
            if name not in accepted:
                known = ", ".join([*sorted(LearnerOptions.__optional_keys__), *accepted])
                raise TypeError(
                    f"{type(self).__name__}() got an unexpected keyword argument {name!r}; "
                    "it takes learn2learn's model, lr, first_order, allow_unused, allow_nograd "
                    f"and the keywords {known}"
                )

    def configure(self, **options: Any) -> None:
        """Take the learner's own keywords (the constructor's beyond :class:`LearnerOptions`):
        a subclass declares them keyword-only, sets them and passes the rest up."""

    @property
    def classification(self) -> bool:
        """Whether the task loss takes class indices (then labels are checked as classes)."""
        return is_classification_loss(self.functional.loss_fn)

    @property
    def features(self) -> nn.Module | None:
        """The feature extractor given as ``features=`` (:class:`LearnerOptions`), or ``None``."""
        return self.functional.features

    def meta_parameters(self) -> Params:
        """theta of the inner loop: the wrapped model's trainable parameters, by name (the
        ``features``' parameters, also meta-learned, are never adapted: not among them)."""
        return self.functional.parameters()

    def task_objective(
        self, task: Task, steps: int | None = None, ops: TaskOps | None = None
    ) -> Objective:
        """The meta-objective of one task (differentiable in theta) and its query accuracy.

        Called without ``ops`` it checks ``task`` and runs on it alone (:class:`SequentialOps`);
        the task runtime passes its own ops, on one task or a stack of tasks.
        """
        raise NotImplementedError

    def _prepare(
        self, task: Task, steps: int | None, ops: TaskOps | None
    ) -> tuple[Task, int, TaskOps]:
        """The task (checked when called directly), the step count and the ops to run on."""
        if ops is None:
            task = check_task_metadata(task, self.classification, self.functional.network)
            check_task(*task, classification=self.classification)
            ops = SequentialOps(self)
        return task, self.resolve_steps(steps), ops

    def loss_and_accuracy(
        self,
        support_inputs: Tensor,
        support_labels: Tensor,
        query_inputs: Tensor,
        query_labels: Tensor,
        steps: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """:meth:`task_objective`'s total and accuracy for one task."""
        task = Task(support_inputs, support_labels, query_inputs, query_labels)
        objective = self.task_objective(task, steps)
        return objective.total, objective.accuracy

    def meta_loss(self, *task: Tensor, steps: int | None = None) -> Tensor:
        """The meta-objective of one task (the arguments of :meth:`loss_and_accuracy`),
        differentiable in theta."""
        if len(task) != 4:
            raise TypeError(
                f"meta_loss takes a task's four tensors (support_inputs, support_labels, "
                f"query_inputs, query_labels) and steps= by keyword, got {len(task)} positional "
                "arguments"
            )
        return self.task_objective(Task(*task), steps).total

    attack: Attack | None = None
    """The attack of the adversarial learners (``None``: a clean learner)."""

    allow_unused: bool
    """learn2learn's switch: unused parameters get no gradient instead of an error."""
    allow_nograd: bool
    """learn2learn's switch: frozen parameters stay frozen instead of an error."""

    two_step_update: tuple[tuple[str, str], tuple[str, str]] | None = None
    """``((loss, accuracy), (loss, accuracy))`` field names of the objective for an update in
    two optimizer steps, one per loss (ADML's line 11); ``None``: one step on ``total``."""

    def resolve_steps(self, steps: int | None) -> int:
        return self.adaptation_steps if steps is None else check_steps("steps", steps)

    def attack_for(self, query: bool) -> Attack | None:
        """The attack that makes a query (or a support) set's adversarial copy."""
        return self.attack


class AdversarialMetaLearner(MetaLearner):
    """A :class:`MetaLearner` that also knows an attack.

    Args:
        model, lr, first_order, allow_unused, allow_nograd: as for :class:`MetaLearner`
            (learn2learn's ``MAML`` arguments).
        **options: :class:`AdversarialOptions` (``attack`` defaults to ``FGSM(eps=2/255)``;
            ``robust_loss``, ``trades_beta``: :attr:`robust`; ``attack_sets`` and
            ``attack_target`` default to :attr:`published_placement`).
    """

    robust: RobustLoss
    """How the adversarial query rows are scored (:mod:`~l2l_adversarial.algorithms.robust`)."""
    published_placement: tuple[str, str] = ("both", "initial")
    """``(attack_sets, attack_target)`` as the method's paper places its attacks: the defaults."""
    placement_sets: tuple[str, ...] = ATTACK_SETS
    """The ``attack_sets`` that mean something for the method."""

    def configure(
        self,
        *,
        attack: Attack | None = None,
        robust_loss: str = "ce",
        trades_beta: float = DEFAULT_TRADES_BETA,
        attack_sets: str | None = None,
        attack_target: str | None = None,
        **options: Any,
    ) -> None:
        """The attack (default ``FGSM(eps=2/255)``), the robustness term (:attr:`robust`) and
        the placement (``None``: :attr:`published_placement`)."""
        super().configure(**options)
        sets = self.published_placement[0] if attack_sets is None else attack_sets
        target = self.published_placement[1] if attack_target is None else attack_target
        check_choice(f"{type(self).__name__}'s attack_sets", sets, self.placement_sets)
        check_choice("attack_target", target, ATTACK_TARGETS)
        robust = RobustLoss(robust_loss, trades_beta)
        if attack is None:
            attack = FGSM(eps=DEFAULT_TRAINING_EPS)
        if not isinstance(attack, Attack):
            raise TypeError(
                "attack must be an l2l_adversarial.attacks.Attack (FGSM, FFGSM, PGD, ...), "
                f"got {type(attack).__name__}"
            )
        self.attack = attack
        robust.attack(attack)  # an attack that cannot maximise the term's objective says so now
        self.robust = robust
        self.attack_sets, self.attack_target = sets, target

    @property
    def attacks_support(self) -> bool:
        """Whether meta-training attacks the support sets (:data:`ATTACK_SETS`)."""
        return self.attack_sets in ("support", "both")

    @property
    def attacks_query(self) -> bool:
        """Whether meta-training attacks the query sets (:data:`ATTACK_SETS`)."""
        return self.attack_sets in ("query", "both")

    def adapt_then_attack_query(
        self, task: Task, steps: int, ops: TaskOps
    ) -> tuple[Params, Tensor]:
        """The inner loop of the methods that adapt on one support set (AQ, R-MAML) and their
        adversarial query set: theta' adapted on the clean support set (with
        ``attack_sets="both"``, on its adversarial copy), and the query set attacked against
        theta' (``attack_target="adapted"``) or theta."""
        support, labels = task.support_inputs, task.support_labels
        if self.attacks_support:
            (support,) = ops.perturb([(support, labels, False)])
        (adapted,) = ops.adapt([(support, labels, self.lr)], steps)
        against = adapted if self.attack_target == "adapted" else None  # None: theta
        (query,) = ops.perturb([(task.query_inputs, task.query_labels, True)], against=against)
        return adapted, query

    def attack_for(self, query: bool) -> Attack | None:
        """:attr:`robust_attack` for query sets (the robustness term scores them),
        :attr:`attack` for support sets (the inner loops' cross-entropy)."""
        return self.robust_attack if query else self.attack

    @property
    def robust_attack(self) -> Attack:
        """The attack making the rows the robustness term scores: :attr:`attack` maximising
        the term's objective (the KL divergence for ``robust_loss="trades"``)."""
        assert self.attack is not None
        return self.robust.attack(self.attack)

    # -- name-only swap detection: learn2learn's clone()/adapt() in a training loop ---------
    def clone(
        self,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
        allow_nograd: bool | None = None,
    ) -> MAML:
        """learn2learn's ``MAML.clone()`` (a plain MAML learner, for evaluation loops).

        If a ``backward()`` later carries a gradient from the clone into theta's ``.grad``,
        the training loop is learn2learn's MAML loop with the class renamed: it would train
        plain MAML, so a :class:`NameOnlySwapWarning` names the fix (once per learner).
        Adapting a clone (``torch.autograd.grad``) and scoring it without ``backward()`` stay
        silent.
        """
        clone = super().clone(first_order, allow_unused, allow_nograd)
        if torch.is_grad_enabled() and not getattr(self, "_swap_warned", False):
            for tensor in clone.parameters():
                if tensor.requires_grad and tensor.grad_fn is not None:
                    tensor.register_hook(self._note_clone_gradient)
            if not getattr(self, "_theta_hooks", None):
                self._theta_hooks = [
                    p.register_post_accumulate_grad_hook(self._check_meta_gradient)
                    for p in self.module.parameters()
                    if p.requires_grad
                ]
        return clone

    def _note_clone_gradient(self, gradient: Tensor) -> None:
        self._clone_graph_task = torch._C._current_graph_task_id()

    def _check_meta_gradient(self, parameter: Tensor) -> None:
        if (
            getattr(self, "_swap_warned", False)
            or getattr(self, "_clone_graph_task", -1) != torch._C._current_graph_task_id()
        ):
            return
        self._swap_warned = True
        name = type(self).__name__
        warnings.warn(
            f"backward() carried a meta-gradient from {name}.clone() into the meta-parameters: "
            f"this is learn2learn's clone()/adapt() training loop, which trains plain MAML with "
            f"{name}'s attack unused. Train with `loss = learner.meta_loss(support_inputs, "
            "support_labels, query_inputs, query_labels)` (then loss.backward()) or "
            "`l2l_adversarial.engines.meta_step(learner, tasks, optimizer)`; keep "
            "clone()/adapt() for evaluation loops (README: 'The API swap').",
            NameOnlySwapWarning,
            stacklevel=2,
        )


class NameOnlySwapWarning(UserWarning):
    """A training loop backpropagated through an adversarial learner's learn2learn ``clone()``:
    it trains plain MAML. Make it an error with
    ``warnings.simplefilter("error", NameOnlySwapWarning)``."""
