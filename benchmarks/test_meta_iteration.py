"""Time per meta-iteration: learn2learn's MAML loop against ADML, MAML-AD and Adversarial
Querying, on the same tasks and the same initial model (see conftest.py for the sizes).

The reference is the loop of learn2learn's MiniImageNet MAML example: per task
``maml.clone()``, ``learner.adapt(loss)`` per inner step, the query loss's ``.backward()``;
then the gradients are divided by the meta-batch size and Adam steps. Our learners run the
same loop with ``meta_loss`` per task, with ``channels_last=True`` (what the command line
uses on the CPU) unless the row says otherwise; one ADML row uses ``meta_step`` with the vmap
engine (the one ``engine="auto"`` picks on CUDA). Our MAML's row shows what the
channels-last query passes alone are worth.
"""

from __future__ import annotations

from collections.abc import Callable

import learn2learn as l2l
import pytest
import torch
from torch import nn

from l2l_adversarial import ADML, FGSM, MAML, MAMLAD, PGD, AdversarialQuerying
from l2l_adversarial.algorithms.base import MetaLearner

from .conftest import REFERENCE, Measure, MeasurePaired, Workload

EPS = 2 / 255  # the paper's meta-training eps = 2 on [0, 1] images
INNER_LR, META_LR = 0.01, 0.001  # the paper's alpha and beta
Iteration = Callable[[], None]


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


def per_task_loop(learner: MetaLearner, workload: Workload) -> Iteration:
    """The reference loop with ``learner.meta_loss(*task)`` as each task's loss."""
    optimizer = torch.optim.Adam(learner.parameters(), META_LR)

    def iteration() -> None:
        optimizer.zero_grad()
        for task in workload.tasks:
            learner.meta_loss(*task).backward()
        for p in learner.parameters():
            p.grad.data.mul_(1.0 / len(workload.tasks))
        optimizer.step()

    return iteration


def maml_loop(workload: Workload) -> Iteration:
    learner = MAML(
        workload.make_model(), lr=INNER_LR, adaptation_steps=workload.size.steps, channels_last=True
    )
    return per_task_loop(learner, workload)


def adml_loop(workload: Workload, attack: FGSM | PGD, channels_last: bool = True) -> Iteration:
    learner = ADML(
        workload.make_model(),
        lr=INNER_LR,
        attack=attack,
        adaptation_steps=workload.size.steps,
        channels_last=channels_last,
    )
    return per_task_loop(learner, workload)


def adml_vmap(workload: Workload) -> Iteration:
    learner = ADML(
        workload.make_model(),
        lr=INNER_LR,
        attack=FGSM(eps=EPS),
        adaptation_steps=workload.size.steps,
    )
    optimizer = torch.optim.Adam(learner.parameters(), META_LR)

    def iteration() -> None:
        learner.meta_step(workload.tasks, optimizer, engine="vmap")

    return iteration


def adversarial_loop(
    learner_class: type[MAMLAD] | type[AdversarialQuerying],
) -> Callable[[Workload], Iteration]:
    def make(workload: Workload) -> Iteration:
        learner = learner_class(
            workload.make_model(),
            lr=INNER_LR,
            attack=FGSM(eps=EPS),
            adaptation_steps=workload.size.steps,
            channels_last=True,
        )
        return per_task_loop(learner, workload)

    return make


METHODS: dict[str, Callable[[Workload], Iteration]] = {
    REFERENCE: maml_reference,
    "maml (ours, meta_loss per task)": maml_loop,
    "adml (meta_loss per task)": lambda w: adml_loop(w, FGSM(eps=EPS)),
    "adml (same, channels_last=False)": lambda w: adml_loop(w, FGSM(eps=EPS), False),
    # PGD with one eps-step from the clean input is FGSM, through the generic path (attack,
    # then adapt): the difference to the first ADML row is the shared support pass.
    "adml (same, no shared support pass)": lambda w: adml_loop(
        w, PGD(eps=EPS, steps=1, step_size=EPS, random_start=False)
    ),
    "adml (meta_step, engine=vmap)": adml_vmap,
    "maml-ad (meta_loss per task)": adversarial_loop(MAMLAD),
    "adversarial querying (meta_loss per task)": adversarial_loop(AdversarialQuerying),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_meta_iteration(method: str, workload: Workload, measure: Measure) -> None:
    measure(method, METHODS[method](workload))


# The performance target (ADML <= 2x learn2learn's MAML, CPU, paper size 1-shot) in paired rounds.
PAIRED = (REFERENCE, "maml (ours, meta_loss per task)", "adml (meta_loss per task)")


def test_paired_rounds(workload: Workload, measure_paired: MeasurePaired) -> None:
    measure_paired({name: METHODS[name](workload) for name in PAIRED})
