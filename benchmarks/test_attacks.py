"""Attack throughput: FGSM and PGD-10 on one task's query set, against CNN4 at its initial
weights (BatchNorm with batch statistics, as in meta-training), in images per second."""

from __future__ import annotations

import pytest
import torch

from l2l_adversarial import FGSM, PGD, Attack

from .conftest import Measure, Workload

EPS = 2 / 255


def make_attack(name: str, device: torch.device) -> Attack:
    if name == "fgsm":
        return FGSM(eps=EPS)
    return PGD(eps=EPS, steps=10, generator=torch.Generator(device).manual_seed(0))


@pytest.mark.parametrize("name", ["fgsm", "pgd-10"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=str)
def test_attack_throughput(
    name: str, layout: torch.memory_format, workload: Workload, measure: Measure
) -> None:
    attack, model = make_attack(name, workload.device), workload.make_model()
    task = workload.tasks[0]
    inputs = task.query_inputs.contiguous(memory_format=layout)
    images = len(inputs)
    suffix = ", channels-last" if layout == torch.channels_last else ""
    measure(
        f"{name} on one query set ({images} images{suffix})",
        lambda: attack(model, inputs, task.query_labels),
        images=images,
    )
