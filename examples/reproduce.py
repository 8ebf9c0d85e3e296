"""Reproduce one of the paper's Tables 1-4 (and, for MiniImageNet, Figures 2-5) end to end:
train every method, evaluate it in the six meta-test scenarios, write the table and figures.

    python examples/reproduce.py --dataset mini-imagenet --shots 1 --root ~/data   # Table 1, Figs 2-3
    python examples/reproduce.py --dataset mini-imagenet --shots 5 --root ~/data   # Table 2, Figs 4-5
    python examples/reproduce.py --dataset cifar100 --shots 1 --root ~/data        # Table 3
    python examples/reproduce.py --dataset cifar100 --shots 5 --root ~/data        # Table 4

Each method trains with the bundled config ``<dataset>-5w<shots>s-<method>`` (``l2l-adversarial
configs`` lists them); ``-o key=value`` overrides apply to all of them (e.g.
``-o train.iterations=1000`` for a short run). A run that is interrupted continues where it
stopped when the same command is run again.

The datasets the robust few-shot literature reports beside the paper's run with the paper's
settings of the closest paper dataset (``DATASETS``: CIFAR-FS and FC100 with CIFAR100's,
tieredImageNet with MiniImageNet's, Omniglot with CIFAR100's), the dataset's name replaced;
their tables have no paper column (docs/data-formats.md has their files):

    python examples/reproduce.py --dataset cifar-fs --shots 1 --root ~/data

``--seeds 0 1 2`` meta-trains every method once per training seed (run folders
``<method>/seed-<seed>``); the report then shows the mean over seeds, the spread across seeds
and paired comparisons of the methods. ``--only-seed S`` runs one of those seeds alone, so the
seeds of one table can be spread over processes or GPUs (then run once more without it, or
with every seed done, to write the report):

    python examples/reproduce.py --dataset cifar100 --shots 1 --root ~/data --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from l2l_adversarial.app.benchmark import run_folder, train_and_evaluate
from l2l_adversarial.app.cli import main as cli

PAPER_METHODS = ("maml", "maml-ad", "adml", "matching-nets")
DATASETS = {
    "mini-imagenet": "mini-imagenet",
    "cifar100": "cifar100",
    "cifar-fs": "cifar100",
    "fc100": "cifar100",
    "tiered-imagenet": "mini-imagenet",
    "omniglot": "cifar100",
}
"""Each dataset and the paper dataset whose bundled configs it trains with."""


def reproduce(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=list(DATASETS), required=True)
    parser.add_argument("--shots", type=int, choices=(1, 5), required=True)
    parser.add_argument("--root", required=True, help="folder holding the dataset files")
    parser.add_argument("--methods", nargs="+", default=list(PAPER_METHODS),
                        choices=("maml", "maml-ad", "adml", "aq", "matching-nets"))  # fmt: skip
    parser.add_argument("--output", default="runs/reproduce", help="folder for runs and report")
    parser.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                        help="meta-train every method once per training seed")  # fmt: skip
    parser.add_argument("--only-seed", type=int, metavar="SEED",
                        help="train and evaluate this one of --seeds, skip the report")  # fmt: skip
    parser.add_argument("-o", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.only_seed is not None and args.only_seed not in (args.seeds or []):
        parser.error(f"--only-seed {args.only_seed} must be one of --seeds")

    output = Path(args.output) / f"{args.dataset}-5w{args.shots}s"
    renamed = [] if DATASETS[args.dataset] == args.dataset else [f"dataset.name={args.dataset}"]
    overrides = [*renamed, f"dataset.root={args.root}", *args.set]
    flags = [flag for override in overrides for flag in ("-o", override)]
    results = []
    seeds: list[int | None] = list(args.seeds or [None])
    for method in args.methods:
        config = f"{DATASETS[args.dataset]}-5w{args.shots}s-{method}"
        for seed in seeds:
            run_dir = run_folder(output, method, seed)
            results.append(str(run_dir / "evaluation.json"))
            if args.only_seed is not None and seed != args.only_seed:
                continue
            seeded = [] if seed is None else ["-o", f"seed={seed}"]
            status = train_and_evaluate(config, run_dir, [*flags, *seeded], {"evaluation.json": []})
            if status:
                return status
    if args.only_seed is not None:
        return 0
    return cli(["report", *results, "--output", str(output / "report"), "--overwrite"])


if __name__ == "__main__":
    sys.exit(reproduce())
