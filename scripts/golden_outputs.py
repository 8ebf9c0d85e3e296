"""Golden outputs for refactoring: what the library computes on fixed seeds, written as JSON.

Run it before moving code and again after; the two files must be equal on the same machine
(``python scripts/golden_outputs.py before.json``, change, ``... after.json``, then
``python scripts/golden_outputs.py --compare before.json after.json``). It records

* ``evaluate``'s per-task accuracies and loss curves for MAML-style learners (CNN4 and MLP,
  float32), Matching Networks, both engines, both protocols, FGSM and PGD with random starts;
* the parameters (SHA-256 of their bytes, and their sum) after ten meta-iterations of
  ``engines.meta_step`` for every method and both engines, ADML also with two optimizers;
* the parameters after ``train`` on the digits data for each method (the application's path).

Only public import paths are used, so the script runs on either side of a refactor.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import l2l_adversarial as l2la
from l2l_adversarial import engines
from l2l_adversarial.evaluation import evaluate, few_shot_learner

WAYS, SHOTS, QUERIES, SIZE = 3, 2, 3, 16


def tasks(count: int, seed: int, shape: tuple[int, ...] = (1, SIZE, SIZE)) -> list[l2la.Task]:
    generator = torch.Generator().manual_seed(seed)
    support_y = torch.arange(WAYS).repeat(SHOTS)
    query_y = torch.arange(WAYS).repeat(QUERIES)
    return [
        l2la.Task(
            torch.rand(len(support_y), *shape, generator=generator),
            support_y,
            torch.rand(len(query_y), *shape, generator=generator),
            query_y,
        )
        for _ in range(count)
    ]


def cnn4(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return l2la.CNN4(ways=WAYS, in_channels=1, hidden=4, image_size=SIZE)


def digest(module: nn.Module) -> dict[str, object]:
    flat = torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])
    data = b"".join(p.detach().contiguous().numpy().tobytes() for p in module.parameters())
    return {"sha256": hashlib.sha256(data).hexdigest(), "sum": float(flat.sum())}


LEARNERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "maml": lambda m: l2la.MAML(m, lr=0.3, adaptation_steps=2),
    "adml": lambda m: l2la.ADML(m, lr=0.3, clean_lr=0.2, adaptation_steps=2),
    "adml-pgd": lambda m: l2la.ADML(m, lr=0.3, adaptation_steps=2, attack=l2la.PGD(8 / 255)),
    "adml-adapted": lambda m: l2la.ADML(m, lr=0.3, adaptation_steps=2, attack_target="adapted"),
    "maml-ad": lambda m: l2la.MAMLAD(m, lr=0.3, adaptation_steps=2, attack=l2la.FFGSM(8 / 255)),
    "maml-ad-half": lambda m: l2la.MAMLAD(m, lr=0.3, adaptation_steps=2, adversarial_fraction=0.5),
    "aq": lambda m: l2la.AdversarialQuerying(m, lr=0.3, adaptation_steps=2),
    "aq-initial": lambda m: l2la.AdversarialQuerying(
        m, lr=0.3, adaptation_steps=2, attack_target="initial"
    ),
}


def trained(name: str, engine: str, two_optimizers: bool = False) -> dict[str, object]:
    learner = LEARNERS[name](cnn4())
    attack = getattr(learner, "attack", None)
    if attack is not None and getattr(attack, "generator", None) is not None:
        attack.generator.manual_seed(7)
    optimizer = torch.optim.Adam(learner.parameters(), lr=1e-3)
    second = torch.optim.Adam(learner.parameters(), lr=1e-3) if two_optimizers else None
    for iteration in range(10):
        engines.meta_step(learner, tasks(2, 100 + iteration), optimizer, second, engine=engine)
    return digest(learner)


def evaluated(model: nn.Module, engine: str, shape: tuple[int, ...], **kw: object) -> dict:
    learner = few_shot_learner(model, lr=0.3, steps=3)
    result = evaluate(learner, tasks(5, 1, shape), method="m", engine=engine, chunk_size=2, **kw)
    return {
        f"{s.epsilon}:{s.scenario}": [s.task_accuracies, s.loss_curve] for s in result.scenarios
    }


def evaluations() -> dict[str, object]:
    out: dict[str, object] = {}
    torch.manual_seed(0)
    mlp = l2la.MLP(in_features=6, ways=WAYS, hidden=(8,))
    pgd = functools.partial(l2la.PGD, steps=3)
    for engine in ("sequential", "vmap"):
        for protocol in ("paper", "adapted"):
            for name, attack in (("fgsm", l2la.FGSM), ("pgd", pgd)):
                key = f"{engine}/{protocol}/{name}"
                out[f"cnn4/{key}"] = evaluated(
                    cnn4(), engine, (1, SIZE, SIZE), protocol=protocol, make_attack=attack,
                    epsilons=(8.0, 2.0),
                )  # fmt: skip
                out[f"mlp/{key}"] = evaluated(
                    mlp, engine, (6,), protocol=protocol, make_attack=attack, epsilons=(8.0,)
                )
    torch.manual_seed(0)
    matching = l2la.MatchingNetwork(ways=WAYS, in_channels=1, image_size=SIZE, hidden=4)
    out["matching/sequential/paper"] = evaluated(matching, "sequential", (1, SIZE, SIZE))
    return out


def trainings() -> dict[str, object]:
    out: dict[str, object] = {}
    for engine in ("sequential", "vmap"):
        for name in LEARNERS:
            out[f"{name}/{engine}"] = trained(name, engine)
        out[f"adml-two-optimizers/{engine}"] = trained("adml", engine, two_optimizers=True)
    return out


def application_runs() -> dict[str, object]:
    """``train`` from a config on the digits data, as the command line runs it."""
    from l2l_adversarial.app.config import load_config
    from l2l_adversarial.app.factory import task_source
    from l2l_adversarial.app.training import train

    out: dict[str, object] = {}
    runs = {
        "adml": ["train.meta_update=sequential", "train.attack=ffgsm"],
        "adml-joint": [],
        "maml-ad": ["train.attack=pgd", "train.pgd_steps=2"],
        "maml": [],
        "aq": [],
        "matching-nets": [],
    }
    for name, extra in runs.items():
        method = name.removesuffix("-joint")
        overrides = [
            f"method={method}", "dataset.name=digits", "dataset.image_size=16", "device=cpu",
            "task.ways=3", "task.shots=1", "task.query_shots=2", "model.hidden=4",
            "train.iterations=4", "train.meta_batch_size=2", "train.adaptation_steps=2",
            "train.log_every=1", "train.inner_lr=0.1", "seed=3", *extra,
        ]  # fmt: skip
        config = load_config(None, overrides)
        source = task_source(config, "train", seed=config["seed"])
        with tempfile.TemporaryDirectory() as folder:
            learner = train(config, Path(folder) / "run", source, progress=False)
        out[name] = digest(learner)
    return out


def leaves(tree: object, path: str = "") -> dict[str, object]:
    """Every value of a nested dict by its path; lists of numbers stay whole."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in leaves(sub, f"{path}/{key}").items()}
    if isinstance(tree, list) and tree and isinstance(tree[0], list):
        return {k: v for i, sub in enumerate(tree) for k, v in leaves(sub, f"{path}[{i}]").items()}
    return {path: tree}


def compare(before: dict, after: dict) -> list[str]:
    """One line per differing value: numbers with their largest difference."""
    old, new = leaves(before), leaves(after)
    lines = [f"{path}: only in one file" for path in sorted(old.keys() ^ new.keys())]
    for path in sorted(old.keys() & new.keys()):
        a, b = old[path], new[path]
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            gap = max(abs(x - y) for x, y in zip(a, b, strict=True))
            lines.append(f"{path}: max difference {gap:.3g}")
        else:
            lines.append(f"{path}: {a!r} != {b!r}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", help="JSON file to write")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(p).read_text()) for p in args.compare)
        differences = compare(before, after)
        print("\n".join(differences) or "identical")
        print(f"{len(differences)} of {len(leaves(before))} values differ")
        return 1 if differences else 0
    torch.set_num_threads(1)
    golden = {
        "evaluate": evaluations(),
        "meta_step": trainings(),
        "train": application_runs(),
    }
    text = json.dumps(golden, indent=1, sort_keys=True)
    if args.output:
        Path(args.output).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
