"""Benchmark the robust meta-learners on one dataset and shot setting: train each method in its
published attack placement with several seeds, evaluate every run on the same seeded test
tasks under the paper's protocol and the literature preset, write one table.

    python examples/benchmark.py --dataset mini-imagenet --shots 1 --root ~/data
    python examples/benchmark.py --dataset cifar-fs --shots 5 --root ~/data --seeds 0 1 2 3 4

Each method trains with the bundled config ``benchmark-<dataset>-5w<shots>s-<method>``
(``l2l-adversarial configs`` lists them; docs/robust-methods.md says what each method is and
what its authors published); ``-o key=value`` overrides apply to every run (e.g.
``-o train.iterations=1000`` for a short one). Every run is evaluated twice, into
``evaluation.json`` (``evaluate.protocol: paper``: FGSM at 2 and 0.2 pixel levels against the
meta-learned initialisation, the paper's six scenarios, 600 tasks) and
``evaluation-literature.json`` (``evaluate.protocol: literature``: PGD-20 at 8/255 against the
adapted model, 1000 tasks; ``-o evaluate.attack=autoattack`` for AutoAttack). The table,
``OUTPUT/<dataset>-5w<shots>s/benchmark.md`` and ``.json``, holds the mean over training seeds,
the spread across them and the paired comparisons of every two methods. Running the command
again continues interrupted trainings; ``--only-seed S`` runs one of the seeds alone (one
process or GPU per seed), and a last run without it writes the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from l2l_adversarial.app.benchmark import (
    BENCHMARK_DATASETS,
    BENCHMARK_METHODS,
    BENCHMARK_SEEDS,
    PROTOCOL_RESULTS,
    benchmark_config,
    run_folder,
    train_and_evaluate,
    write_benchmark,
)
from l2l_adversarial.errors import UserError, describe_os_error


def benchmark(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--dataset", choices=BENCHMARK_DATASETS, required=True)
    parser.add_argument("--shots", type=int, choices=(1, 5), required=True)
    parser.add_argument("--root", required=True, help="folder holding the dataset files")
    parser.add_argument("--methods", nargs="+", default=list(BENCHMARK_METHODS),
                        choices=list(BENCHMARK_METHODS))  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=list(BENCHMARK_SEEDS),
                        metavar="SEED", help="training seeds of every method (default "
                        f"{' '.join(map(str, BENCHMARK_SEEDS))})")  # fmt: skip
    parser.add_argument("--only-seed", type=int, metavar="SEED",
                        help="train and evaluate this one of --seeds, skip the table")  # fmt: skip
    parser.add_argument("--output", default="runs/benchmark", help="folder for runs and table")
    parser.add_argument("-o", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    if args.only_seed is not None and args.only_seed not in args.seeds:
        parser.error(f"--only-seed {args.only_seed} must be one of --seeds")

    output = Path(args.output) / f"{args.dataset}-5w{args.shots}s"
    flags = [flag for o in [f"dataset.root={args.root}", *args.set] for flag in ("-o", o)]
    evaluations = dict(PROTOCOL_RESULTS.values())
    for method in args.methods:
        for seed in args.seeds if args.only_seed is None else [args.only_seed]:
            status = train_and_evaluate(benchmark_config(args.dataset, args.shots, method),
                                        run_folder(output, method, seed),
                                        [*flags, "-o", f"seed={seed}"], evaluations)  # fmt: skip
            if status:
                return status
    if args.only_seed is not None:
        return 0
    try:
        for path in write_benchmark(output, args.methods, args.seeds):
            print(f"wrote {path}")
    except (UserError, OSError) as error:  # e.g. a run's results file missing
        message = str(error) if isinstance(error, UserError) else describe_os_error(error)
        print(f"error: {message}", file=sys.stderr)
        return 2
    print((output / "benchmark.md").read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(benchmark())
