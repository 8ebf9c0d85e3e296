"""Meta-test cost: one task through ``evaluate`` (the paper's six scenarios, eps = 2, 10
adaptation steps, paper protocol) with the learner's default and channels-last query layout,
in paired rounds (the summary's ratio is channels-last over default); a chunk of tasks on
each engine; and the wait for test tasks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

from l2l_adversarial import ADML, CNN4, Task
from l2l_adversarial.data import FewShotTasks, MiniImageNet
from l2l_adversarial.evaluation import GradientLearner, evaluate

from .conftest import Measure, MeasurePaired, Size, Workload
from .test_data_pipeline import write_generated_cache

STEPS, LR = 10, 0.01  # the paper's meta-test adaptation


def test_evaluation_of_one_task(workload: Workload, measure_paired: MeasurePaired) -> None:
    model, task = workload.make_model(), workload.tasks[:1]

    def run(channels_last: bool) -> Callable[[], object]:
        learner = GradientLearner(ADML(model, lr=LR, channels_last=channels_last), LR, STEPS)
        return lambda: evaluate(learner, task, method="ADML", epsilons=(2.0,))

    measure_paired({"evaluate one task": run(False), "evaluate one task, channels-last": run(True)})


@pytest.mark.parametrize("engine", ["sequential", "vmap"])
def test_evaluation_engines(workload: Workload, measure: Measure, engine: str) -> None:
    """A chunk of the size's meta-batch of tasks through ``evaluate`` on each engine: the
    row's ops, launches and syncs are for the whole chunk (divide by the task count)."""
    model, tasks = workload.make_model(), workload.tasks
    learner = GradientLearner(ADML(model, lr=LR), LR, STEPS)
    measure(
        f"evaluate {len(tasks)} tasks, {engine}",
        lambda: evaluate(
            learner, tasks, method="ADML", epsilons=(2.0,), engine=engine, chunk_size=len(tasks)
        ),
    )


@pytest.fixture(scope="session")
def test_split(tmp_path_factory: pytest.TempPathFactory, size: Size) -> MiniImageNet:
    """A generated MiniImageNet-format test cache (20 classes) at this size's image side."""
    root = tmp_path_factory.mktemp(f"mini-imagenet-test-{size.name}")
    write_generated_cache(root, "test", size.image, classes=20)
    return MiniImageNet(root, "test", strict=False)


class _BuiltInPlace(Sequence[Task]):
    """The same tasks with no ``thread_safe`` flag: ``evaluate`` builds each when it needs it."""

    def __init__(self, tasks: FewShotTasks) -> None:
        self.tasks = tasks

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> Task:  # type: ignore[override]
        return self.tasks[index]


def test_evaluation_waiting_for_data(
    measure_paired: MeasurePaired, size: Size, test_split: MiniImageNet
) -> None:
    """``evaluate`` on tasks built beforehand, on the thread-safe ``FewShotTasks`` (the next
    chunk built in a background thread) and on the same tasks built in place; one
    adaptation step, one eps and the vmap engine's chunk of 4 make each task cheap, so the
    wait for data shows (the summary's ratios are to the tasks built beforehand)."""
    tasks = FewShotTasks(test_split, size.ways, size.shots, size.queries, seed=0,
                         num_tasks=2 * size.meta_batch)  # fmt: skip
    torch.manual_seed(0)
    learner = GradientLearner(CNN4(size.ways, 3, size.hidden, size.image), LR, 1)

    def run(source: Sequence[Task]) -> Callable[[], object]:
        return lambda: evaluate(learner, source, method="MAML", epsilons=(2.0,),
                                engine="vmap", chunk_size=4)  # fmt: skip

    measure_paired({
        "evaluate, tasks built beforehand": run([tasks[i] for i in range(len(tasks))]),
        "evaluate, FewShotTasks (next chunk in a thread)": run(tasks),
        "evaluate, tasks built in place": run(_BuiltInPlace(tasks)),
    })  # fmt: skip
