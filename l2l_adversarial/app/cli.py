"""The ``l2l-adversarial`` command line (also ``python -m l2l_adversarial``): it parses the
arguments and calls the application (:mod:`~l2l_adversarial.app.runs`,
:mod:`~l2l_adversarial.app.quickstart`, :mod:`~l2l_adversarial.app.report`,
:mod:`~l2l_adversarial.app.configs`); :func:`main` turns errors into exit codes. ``--help``
prints plain text: :data:`DESCRIPTION`, the commands, :data:`EXAMPLES` and the guide's pages.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from l2l_adversarial.app.config import ConfigError
from l2l_adversarial.app.configs import describe_bundled_configs
from l2l_adversarial.app.quickstart import QUICKSTART_ITERATIONS, QUICKSTART_TASKS, Quickstart
from l2l_adversarial.app.report import report_results
from l2l_adversarial.app.runs import CHECKPOINTS, evaluate_runs, train_runs
from l2l_adversarial.app.signals import interrupt_on_signals
from l2l_adversarial.distributed import init_from_environment, is_distributed, shutdown, world
from l2l_adversarial.errors import UserError, describe_os_error

__all__ = ["build_parser", "main"]

DISTRIBUTED_COMMANDS = ("train", "evaluate")
"""Commands that split their work over the processes of a torchrun launch."""

AGAIN = {
    "train": "run again, with --resume if it saved a checkpoint (that is kept)",
    **dict.fromkeys(("evaluate", "report", "quickstart"),
                    "run again, with --overwrite if it wrote results (those are kept)"),
}  # fmt: skip
"""How each command goes on once the disk has room again."""
DOCUMENTATION = "the documentation: docs/ (mkdocs serve)"
DESCRIPTION = (
    "Adversarial meta-learning (ADML, MAML-AD, MAML, Adversarial Querying, Matching Networks): "
    "train, evaluate and report the paper's experiments, or run the quickstart."
)
EXAMPLES = """\
examples:
  l2l-adversarial quickstart                     MAML, MAML-AD and ADML on digits, a few minutes
  l2l-adversarial configs                        the bundled configs (the paper's settings)
  l2l-adversarial train mini-imagenet-5w1s-adml -o dataset.root=~/data
  l2l-adversarial evaluate runs/mini-imagenet-5w1s-adml
  l2l-adversarial report runs/*/evaluation.json --output report
  torchrun --standalone --nproc_per_node=2 -m l2l_adversarial train CONFIG
  l2l-adversarial train CONFIG -o train.engine=vmap   batch each meta-batch's tasks
                                                 (experimental; evaluate.engine likewise)"""


def _guide(*pages: str) -> str:
    """A subcommand's epilog: where its guide is."""
    return f"Guide: {', '.join(pages)} in {DOCUMENTATION}."


def command_train(args: argparse.Namespace) -> int:
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    if args.accept_changes and not args.resume:
        raise ConfigError("--accept-changes applies to --resume only; add --resume")
    train_runs(args.config, args.set, run_dir=args.run_dir, seeds=args.seeds,
               resume=args.resume, overwrite=args.overwrite,
               accept_changes=args.accept_changes, progress=not args.quiet)  # fmt: skip
    return 0


def command_evaluate(args: argparse.Namespace) -> int:
    evaluate_runs(args.run_dir, args.set, output=args.output, checkpoint=args.checkpoint,
                  overwrite=args.overwrite, progress=not args.quiet)  # fmt: skip
    return 0


def command_report(args: argparse.Namespace) -> int:
    report_results(args.results, args.output, epsilon=args.epsilon, overwrite=args.overwrite)
    return 0


def command_quickstart(args: argparse.Namespace) -> int:
    Quickstart(Path(args.output), iterations=args.iterations, tasks=args.tasks, seed=args.seed,
               overrides=args.set, overwrite=args.overwrite, progress=not args.quiet).run()  # fmt: skip
    return 0


def command_configs(args: argparse.Namespace) -> int:
    print(describe_bundled_configs())
    return 0


def _key_list(text: str) -> list[str]:
    return [key.strip() for key in text.split(",") if key.strip()]


def _add_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    *pages: str,
) -> argparse.ArgumentParser:
    """A subcommand whose one-line ``summary`` is its help and description."""
    description = f"{summary[0].upper()}{summary[1:]}."
    return commands.add_parser(name, help=summary, description=description, epilog=_guide(*pages))


def _add_common(sub: argparse.ArgumentParser, overwrite: str = "replace existing results") -> None:
    sub.add_argument("-o", "--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. -o train.iterations=100 (repeatable)")  # fmt: skip
    sub.add_argument("--overwrite", action="store_true", help=overwrite)
    sub.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_train(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = _add_command(commands, "train", "meta-train one method from a config into a run "
                       "folder", "reproducing.md", "runs.md")  # fmt: skip
    sub.add_argument("config", nargs="?", help="a bundled config's name (l2l-adversarial "
                     "configs lists them) or a YAML file's path; the defaults if omitted")  # fmt: skip
    sub.add_argument("--run-dir", help="run folder (default: runs/<dataset>-<ways>w<shots>s-"
                     "<method>, or the config's run_dir)")  # fmt: skip
    sub.add_argument("--resume", action="store_true",
                     help="continue the run in --run-dir from its checkpoint, exactly")  # fmt: skip
    sub.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                     help="train one run per training seed, in RUN_DIR/seed-<seed> (or the "
                     "config's seeds: [...]); one process per seed spreads them")  # fmt: skip
    sub.add_argument("--accept-changes", type=_key_list, default=[], metavar="KEY[,KEY]",
                     help="with --resume: continue although these config keys changed "
                     "(e.g. train.meta_lr); config.yaml records the change")  # fmt: skip
    _add_common(sub, overwrite="replace the run folder's results (moved aside until the "
                "new run's first checkpoint)")  # fmt: skip
    sub.set_defaults(handler=command_train)


def _add_evaluate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = _add_command(commands, "evaluate", "evaluate a trained run in the paper's six "
                       "scenarios", "reproducing.md", "runs.md")  # fmt: skip
    sub.add_argument("run_dir", help="a run folder of the train command, or a folder of its "
                     "seed-<seed> runs (each evaluated)")  # fmt: skip
    sub.add_argument("--output", help="results JSON (default: RUN_DIR/evaluation.json, "
                     "RUN_DIR/evaluation_best.json with --checkpoint best)")  # fmt: skip
    sub.add_argument("--checkpoint", choices=sorted(CHECKPOINTS), default="last",
                     help="the last checkpoint, or the best one of meta-validation (best.pt)")  # fmt: skip
    _add_common(sub)
    sub.set_defaults(handler=command_evaluate)


def _add_report(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = _add_command(commands, "report", "write the paper's tables (Markdown, JSON) and "
                       "figures from evaluation results", "reproducing.md")  # fmt: skip
    sub.add_argument("results", nargs="+", help="evaluation JSON files (evaluate's output)")
    sub.add_argument("--output", default="report",
                     help="folder for the tables and figures (default: report)")  # fmt: skip
    sub.add_argument("--overwrite", action="store_true", help="replace existing files")
    sub.add_argument("--epsilon", type=float, default=2.0,
                     help="radius (pixel levels) of the step-by-step figures (default 2)")  # fmt: skip
    sub.set_defaults(handler=command_report)


def _add_quickstart(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = _add_command(commands, "quickstart", "train and compare MAML, MAML-AD and ADML on "
                       "the bundled digits, on a CPU in a few minutes", "getting-started.md")  # fmt: skip
    sub.add_argument("--output", default="runs/quickstart",
                     help="folder for the runs, results and figures (default: runs/quickstart)")  # fmt: skip
    sub.add_argument("--iterations", type=int, default=QUICKSTART_ITERATIONS,
                     help=f"meta-iterations per method (default {QUICKSTART_ITERATIONS})")  # fmt: skip
    sub.add_argument("--tasks", type=int, default=QUICKSTART_TASKS,
                     help=f"test tasks per scenario (default {QUICKSTART_TASKS})")  # fmt: skip
    sub.add_argument("--seed", type=int, default=0,
                     help="training seed of the three methods (default 0)")  # fmt: skip
    _add_common(sub)
    sub.set_defaults(handler=command_quickstart)


class _Parser(argparse.ArgumentParser):
    """A usage mistake (an unknown option, a value of the wrong type) ends like every other
    bad input: one ``error:`` line and status 2; its subcommands' parsers are of this class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}, in {self.prog}; see {self.prog} --help\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and the examples as written (already wrapped), commands' help aligned."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=16)


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: one subcommand per command, each with its handler."""
    parser: argparse.ArgumentParser = _Parser(
        prog="l2l-adversarial",
        description=textwrap.fill(DESCRIPTION, 79),
        epilog=f"{EXAMPLES}\n\n{_guide('getting-started.md', 'reproducing.md', 'runs.md')}",
        formatter_class=_HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, title="commands",
                                     help="l2l-adversarial COMMAND --help lists its options")  # fmt: skip
    _add_quickstart(commands)
    _add_train(commands)
    _add_evaluate(commands)
    _add_report(commands)
    sub = _add_command(commands, "configs", "list the bundled configs (the paper's "
                       "settings)", "reproducing.md")  # fmt: skip
    sub.set_defaults(handler=command_configs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; a user's error ends as one ``error: ...`` line and status 2, a signal
    as one line and ``128 + signal``, anything else (a bug) with its traceback and status 1."""
    args = build_parser().parse_args(argv)
    joins_group = args.command in DISTRIBUTED_COMMANDS and not is_distributed()
    rank, world_size = world()
    try:
        with interrupt_on_signals():
            if joins_group:
                init_from_environment()  # under torchrun; nothing otherwise
                rank, world_size = world()
            return int(args.handler(args))
    except (UserError, OSError) as error:
        message = (
            str(error)
            if isinstance(error, UserError)
            else describe_os_error(error, AGAIN.get(args.command, "run again"))
        )
        where = f" (rank {rank} of {world_size})" if world_size > 1 else ""
        print(f"error{where}: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        name = getattr(interrupt, "name", "SIGINT")
        message = str(interrupt) or (
            f"interrupted ({name}) before {args.command} wrote its results; run it again"
        )
        print(message, file=sys.stderr)
        return int(getattr(interrupt, "exit_code", 130))
    except Exception:
        traceback.print_exc()
        print(
            f"error: internal error in l2l-adversarial {args.command} (a bug, not your input); "
            "please report it with the traceback above",
            file=sys.stderr,
        )
        return 1
    finally:
        if joins_group:
            shutdown()


if __name__ == "__main__":
    sys.exit(main())
