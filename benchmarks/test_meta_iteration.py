"""Time, ATen ops and syncs per meta-iteration: learn2learn's MAML loop against MAML, ADML,
MAML-AD and Adversarial Querying run by ``engines.meta_step`` (what ``train`` runs; the
"train's step" rows with the value checks off, as ``train`` runs it), with the sequential and
the vmap engine (CNN4 folded into one grouped network; the "not folded" rows vmapped, as
models outside the layers it folds run), on the same tasks and the same initial model (see
conftest.py for the sizes).

The reference is the loop of learn2learn's MiniImageNet MAML example: per task
``maml.clone()``, ``learner.adapt(loss)`` per inner step, the query loss's ``.backward()``;
then the gradients are divided by the meta-batch size and Adam steps. Our sequential rows use
``channels_last=True`` (what the command line uses on the CPU) unless the row says otherwise;
the vmap engine ignores it.
"""

from __future__ import annotations

from collections.abc import Callable

import learn2learn as l2l
import pytest
import torch
from torch import nn

from l2l_adversarial import ADML, FGSM, MAML, MAMLAD, AdversarialQuerying, engines
from l2l_adversarial.algorithms.base import MetaLearner
from l2l_adversarial.validation import value_checks

from .conftest import REFERENCE, Measure, MeasurePaired, Workload

EPS = 2 / 255  # the paper's meta-training eps = 2 on [0, 1] images
INNER_LR, META_LR = 0.01, 0.001  # the paper's alpha and beta
Iteration = Callable[[], None]


class OwnForward(nn.Module):
    """A model with a forward pass of its own: :mod:`l2l_adversarial.runtime.layouts` cannot fold it."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.net(inputs)


def maml_reference(workload: Workload) -> Iteration:
    model = workload.make_model()
    maml = l2l.algorithms.MAML(model, lr=INNER_LR, first_order=False)
    optimizer = torch.optim.Adam(maml.parameters(), META_LR)

    def iteration() -> None:
        optimizer.zero_grad()
        for task in workload.tasks:
            learner = maml.clone()
            for _ in range(workload.size.steps):
                support_loss = nn.functional.cross_entropy(
                    learner(task.support_inputs), task.support_labels
                )
                learner.adapt(support_loss)
            evaluation_error = nn.functional.cross_entropy(
                learner(task.query_inputs), task.query_labels
            )
            evaluation_error.backward()
        for p in maml.parameters():
            p.grad.data.mul_(1.0 / len(workload.tasks))
        optimizer.step()

    return iteration


LEARNERS: dict[str, Callable[..., MetaLearner]] = {
    "maml": lambda model, steps, **kw: MAML(model, lr=INNER_LR, adaptation_steps=steps, **kw),
    "adml": lambda model, steps, **kw: ADML(
        model, lr=INNER_LR, adaptation_steps=steps, **{"attack": FGSM(eps=EPS), **kw}
    ),
    "maml-ad": lambda model, steps, **kw: MAMLAD(
        model, lr=INNER_LR, attack=FGSM(eps=EPS), adaptation_steps=steps, **kw
    ),
    "aq": lambda model, steps, **kw: AdversarialQuerying(
        model, lr=INNER_LR, attack=FGSM(eps=EPS), adaptation_steps=steps, **kw
    ),
}


def engine_step(
    method: str,
    engine: str,
    chunk_size: int | None = None,
    checked: bool = True,
    folded: bool = True,
    **options: object,
) -> Callable[[Workload], Iteration]:
    """One ``engines.meta_step`` of ``method``'s learner with ``engine`` (and, for vmap,
    ``chunk_size`` tasks per batched call; the whole meta-batch by default); ``checked=False``:
    with value checks off, as ``train`` runs it (it checks each meta-batch where the data
    pipeline builds it, :func:`l2l_adversarial.app.training.check_values`); ``folded=False``: CNN4
    behind a forward pass of its own, which the vmap engine runs vmapped instead of folded
    (:mod:`l2l_adversarial.runtime.layouts`), as it runs any model outside the layers it folds."""

    def make(workload: Workload) -> Iteration:
        options.setdefault("channels_last", engine == "sequential")
        model = workload.make_model() if folded else OwnForward(workload.make_model())
        learner = LEARNERS[method](model, workload.size.steps, **options)
        optimizer = torch.optim.Adam(learner.parameters(), META_LR)

        def iteration() -> None:
            with value_checks(checked):
                engines.meta_step(
                    learner, workload.tasks, optimizer, engine=engine, chunk_size=chunk_size
                )

        return iteration

    return make


METHODS: dict[str, Callable[[Workload], Iteration]] = {
    REFERENCE: maml_reference,
    **{
        f"{method} (meta_step, {engine})": engine_step(method, engine)
        for method in LEARNERS
        for engine in ("sequential", "vmap")
    },
    **{
        f"{method} (train's step, vmap)": engine_step(method, "vmap", checked=False)
        for method in LEARNERS
    },
    **{
        f"{method} (meta_step, vmap, not folded)": engine_step(method, "vmap", folded=False)
        for method in LEARNERS
    },
    # peak memory against the vmap engine's chunk size (the meta-batch is 4 tasks)
    **{
        f"adml (meta_step, vmap, chunk_size={chunk})": engine_step("adml", "vmap", chunk)
        for chunk in (1, 2)
    },
    "adml (sequential, channels_last=False)": engine_step(
        "adml", "sequential", channels_last=False
    ),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_meta_iteration(method: str, workload: Workload, measure: Measure) -> None:
    measure(method, METHODS[method](workload))


# The performance target (ADML <= 2x learn2learn's MAML, CPU, paper size 1-shot) in paired rounds.
PAIRED = (REFERENCE, "maml (meta_step, sequential)", "adml (meta_step, sequential)")


def test_paired_rounds(workload: Workload, measure_paired: MeasurePaired) -> None:
    measure_paired({name: METHODS[name](workload) for name in PAIRED})
