"""Meta-test cost: one task through ``evaluate`` (the paper's six scenarios, eps = 2, 10
adaptation steps, paper protocol) with the learner's default and channels-last query layout,
in paired rounds (the summary's ratio is channels-last over default)."""

from __future__ import annotations

from collections.abc import Callable

from l2l_adversarial import ADML
from l2l_adversarial.evaluation import GradientLearner, evaluate

from .conftest import MeasurePaired, Workload

STEPS, LR = 10, 0.01  # the paper's meta-test adaptation


def test_evaluation_of_one_task(workload: Workload, measure_paired: MeasurePaired) -> None:
    model, task = workload.make_model(), workload.tasks[:1]

    def run(channels_last: bool) -> Callable[[], object]:
        learner = GradientLearner(ADML(model, lr=LR, channels_last=channels_last), LR, STEPS)
        return lambda: evaluate(learner, task, method="ADML", epsilons=(2.0,))

    measure_paired({"evaluate one task": run(False), "evaluate one task, channels-last": run(True)})
