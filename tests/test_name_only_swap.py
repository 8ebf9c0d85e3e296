"""A learn2learn clone()/adapt() training loop with an adversarial learner is caught; the same
calls in an evaluation loop, and training with meta_loss, are not."""

from __future__ import annotations

import warnings

import learn2learn as l2l
import pytest
import torch
from torch import nn

from l2l_adversarial import ADML, FGSM, MAMLAD, AdversarialQuerying
from l2l_adversarial.algorithms.base import NameOnlySwapWarning

LEARNERS = [ADML, MAMLAD, AdversarialQuerying]
WAYS = 3


def learner_and_task(cls, first_order=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, WAYS))
    learner = cls(model, lr=0.1, first_order=first_order, attack=FGSM(eps=0.05))
    x = torch.rand(12, 4)
    y = torch.arange(WAYS).repeat(4)
    return learner, (x[:6], y[:6], x[6:], y[6:])


def learn2learn_step(learner, task, backward=True):
    """learn2learn's example loop body: clone, adapt on the support set, score the query."""
    support_x, support_y, query_x, query_y = task
    clone = learner.clone()
    clone.adapt(nn.functional.cross_entropy(clone(support_x), support_y))
    loss = nn.functional.cross_entropy(clone(query_x), query_y)
    if backward:
        loss.backward()
    return loss


@pytest.mark.parametrize("cls", LEARNERS)
@pytest.mark.parametrize("first_order", [False, True])
def test_clone_adapt_training_loop_warns_once_naming_meta_loss(cls, first_order):
    learner, task = learner_and_task(cls, first_order)
    with pytest.warns(NameOnlySwapWarning, match=r"trains plain MAML.*meta_loss") as record:
        learn2learn_step(learner, task)
        learn2learn_step(learner, task)
    assert len([w for w in record if w.category is NameOnlySwapWarning]) == 1
    # the meta-gradient itself is learn2learn's MAML one, untouched by the hooks
    reference = l2l.algorithms.MAML(learner.module, lr=0.1, first_order=first_order)
    learner.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NameOnlySwapWarning)
        learn2learn_step(learner, task)
    ours = [p.grad.clone() for p in learner.parameters()]
    learner.zero_grad()
    learn2learn_step(reference, task)
    assert all(torch.equal(a, p.grad) for a, p in zip(ours, reference.parameters(), strict=True))


@pytest.mark.parametrize("cls", LEARNERS)
def test_evaluation_loops_and_meta_loss_training_stay_silent(cls):
    learner, task = learner_and_task(cls)
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NameOnlySwapWarning)
        for _ in range(2):
            optimizer.zero_grad()
            learner.meta_loss(*task).backward()  # the right training loop
            optimizer.step()
            learn2learn_step(learner, task, backward=False)  # validation: clone + adapt
            with torch.no_grad():
                learner.clone()(task[2])
        learner.meta_loss(*task).backward()  # training after validation clones: still silent
    assert all(p.grad is not None for p in learner.parameters())


def test_warning_can_be_made_an_error():
    learner, task = learner_and_task(ADML)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NameOnlySwapWarning)
        with pytest.raises(NameOnlySwapWarning, match="ADML.clone"):
            learn2learn_step(learner, task)


def test_plain_maml_keeps_learn2learns_clone_loop_silently():
    from l2l_adversarial import MAML

    torch.manual_seed(0)
    maml = MAML(nn.Linear(4, WAYS), lr=0.1)
    x, y = torch.rand(6, 4), torch.arange(WAYS).repeat(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NameOnlySwapWarning)
        learn2learn_step(maml, (x, y, x, y))
