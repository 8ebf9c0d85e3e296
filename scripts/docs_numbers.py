"""Regenerate the figures that README.md and docs/ quote, from the commands that print them.

Each figure sits in a page between two markers,

    <!-- docs-numbers:NAME begin -->
    ...
    <!-- docs-numbers:NAME end -->

and this script replaces what is between them with the command's output, preceded by the
commit, the machine and the date it ran at. A name may appear in several pages (the
quickstart's table is in README.md and docs/getting-started.md); every occurrence gets the
same text.

    python scripts/docs_numbers.py                        # quickstart, counts, small (15-25 min on 2 cores)
    python scripts/docs_numbers.py --only counts          # some of them
    python scripts/docs_numbers.py --only gpu --gpu-check gpu-check   # after `make gpu-check` on a GPU

NAME         command                                                               pages
quickstart   l2l-adversarial quickstart                                            README.md, docs/getting-started.md
counts       pytest benchmarks/test_meta_iteration.py -k test_meta_iteration \\
                 --bench-sizes=counts --benchmark-disable -q -s                    docs/performance.md
small        pytest benchmarks/test_meta_iteration.py -k 'not chunk' \\
                 --bench-sizes=small --bench-threads=1 -q -s                       docs/performance.md
gpu          the table `make gpu-check` wrote (gpu-check/gpu-check.md), or         docs/performance.md
             "unmeasured" when --gpu-check is not given

Commit the pages right after: the commit named is the one whose code ran (HEAD, with a note
if l2l_adversarial/ or benchmarks/ had uncommitted changes).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(
    r"(?P<begin><!-- docs-numbers:(?P<name>[\w-]+) begin -->\n)(?P<body>.*?)"
    r"(?P<end><!-- docs-numbers:(?P=name) end -->)",
    re.S,
)
QUICKSTART_COMMAND = ["quickstart", "--quiet"]
COUNTS_COMMAND = [
    "benchmarks/test_meta_iteration.py", "-k", "test_meta_iteration", "--bench-sizes=counts",
    "--benchmark-disable", "-q", "-s", "-p", "no:cacheprovider",
]  # fmt: skip
SMALL_COMMAND = [
    "benchmarks/test_meta_iteration.py", "-k", "not chunk",
    "--bench-sizes=small", "--bench-threads=1", "-q", "-s", "-p", "no:cacheprovider",
]  # fmt: skip
NAMES = ("quickstart", "counts", "small", "gpu")


def pages(repo: Path = REPO) -> list[Path]:
    """README.md and every Markdown page under docs/."""
    return [repo / "README.md", *sorted((repo / "docs").rglob("*.md"))]


def replace_blocks(text: str, blocks: dict[str, str]) -> str:
    """``text`` with the body of every marker named in ``blocks`` replaced by its value."""

    def body(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in blocks:
            return match[0]
        return match["begin"] + blocks[name].rstrip("\n") + "\n" + match["end"]

    return MARKER.sub(body, text)


def write_blocks(blocks: dict[str, str], files: Iterable[Path]) -> list[Path]:
    """Write ``blocks`` into the markers of ``files``; returns the files changed. Every name
    must have a marker somewhere."""
    found: set[str] = set()
    changed = []
    for path in files:
        text = path.read_text()
        found.update(m["name"] for m in MARKER.finditer(text))
        new = replace_blocks(text, blocks)
        if new != text:
            path.write_text(new)
            changed.append(path)
    missing = sorted(set(blocks) - found)
    if missing:
        raise SystemExit(f"no <!-- docs-numbers:NAME begin --> marker for {', '.join(missing)}")
    return changed


# -- provenance --------------------------------------------------------------------------
def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def commit() -> str:
    """HEAD's short hash, and a note when the code that ran differs from it."""
    head = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--", "l2l_adversarial", "benchmarks")
    return head + (" with uncommitted changes to the code" if dirty else "")


def machine(load_before: float) -> str:
    """The CPU (model, cores), the GPU, if any, as this process sees them, and the load
    average (1 minute) before and after the command: other jobs on the machine slow it."""
    model = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
        versions = f"torch {torch.__version__}"
    except ImportError:
        gpu, versions = "GPU unknown", "torch not importable"
    load = f", load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    return (
        f"{os.cpu_count()}-core CPU ({model}), {gpu}{load}; "
        f"Python {platform.python_version()}, {versions}"
    )


def provenance(command: str, load_before: float) -> str:
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return (
        f"Generated by `python scripts/docs_numbers.py` on {today} at commit `{commit()}`, "
        f"{machine(load_before)}: `{command}` printed"
    )


def run(arguments: list[str], cwd: Path) -> str:
    """What ``python ARGUMENTS`` prints in ``cwd``, this checkout's package imported."""
    result = subprocess.run(
        [sys.executable, *arguments], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(arguments)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return result.stdout


# -- the quickstart ----------------------------------------------------------------------
def run_quickstart() -> str:
    """What ``l2l-adversarial quickstart`` prints, run in an empty folder (so the paths it
    prints are the default ``runs/quickstart/...``)."""
    with tempfile.TemporaryDirectory(prefix="docs-numbers-") as folder:
        return run(["-m", "l2l_adversarial", *QUICKSTART_COMMAND], Path(folder))


def _adversarial_row(output: str, method: str) -> tuple[float, float]:
    """Clean-support, adversarial-query accuracy and interval of ``method`` in the table."""
    match = re.search(
        rf"^\| {re.escape(method)} \| Clean \| [\d.]+ ± [\d.]+ \| ([\d.]+) ± ([\d.]+) \|$",
        output,
        re.M,
    )
    if match is None:
        raise SystemExit(f"no '{method} | Clean' row in the quickstart's output:\n{output}")
    return float(match[1]), float(match[2])


def quickstart_block(output: str, origin: str) -> str:
    """The output as it was printed, and a sentence that compares ADML with the others."""
    epsilon = re.search(r"^ε = (\S+) pixel levels", output, re.M)
    if epsilon is None:
        raise SystemExit(f"no radius line in the quickstart's output:\n{output}")
    adml, adml_ci = _adversarial_row(output, "ADML")
    lines = []
    for other in ("MAML", "MAML-AD"):
        accuracy, ci = _adversarial_row(output, other)
        gap = adml - accuracy
        separated = "more than" if abs(gap) > adml_ci + ci else "within"
        lines.append(
            f"{gap:+.1f} points against {other} ({separated} the sum of the two 95 % "
            f"intervals, {adml_ci + ci:.2f})"
        )
    text = "\n".join(line.rstrip() for line in output.strip("\n").splitlines())
    return (
        f"{origin}:\n\n```text\n{text}\n```\n\n"
        f"ADML's Clean-Adversarial accuracy at ε = {epsilon[1]}: {'; '.join(lines)}.\n"
    )


# -- benchmark tables: op and sync counts, small-size times ---------------------------------
BENCH_HEADER = (
    "benchmark median s min s rounds x MAML (min) GFLOP (x) +RSS MB CUDA MB images/s ops (x) "
    "launch (x) syncs"
).split()
BENCH_COLUMNS = [
    "median s", "min s", "rounds", "x MAML", "x MAML (min)", "GFLOP", "GFLOP x", "+RSS MB",
    "CUDA MB", "images/s", "ops", "ops x", "launches", "launches x", "syncs",
]  # fmt: skip
"""The columns of benchmarks/conftest.py's summary table, in order."""
Columns = list[tuple[str, str]]  # (heading on the page, column of the benchmark's table)
COUNTS_COLUMNS: Columns = [("ATen ops", "ops"), ("x l2l", "ops x"), ("launches", "launches"),
                           ("x l2l", "launches x"), ("syncs", "syncs")]  # fmt: skip
SMALL_COLUMNS: Columns = [("median s", "median s"), ("min s", "min s"), ("x MAML", "x MAML"),
                          ("x MAML (min)", "x MAML (min)"), ("GFLOP x", "GFLOP x"),
                          ("+RSS MB", "+RSS MB")]  # fmt: skip
PAIRED_HEADER = "benchmark median s x first min max rounds".split()


def _table(lines: list[str], start: int, header: list[str]) -> list[tuple[str, list[str]]]:
    """(name, values) of the rows under ``lines[start]`` (a ``[size] ...`` line) down to the
    first blank line; the next line must be ``header``."""
    if lines[start + 1].split() != header:
        raise SystemExit(f"unexpected columns under {lines[start]!r}: {lines[start + 1]}")
    rows = []
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        rows.append((line[:52].strip(), line[52:].split()))
    return rows


def benchmark_block(
    output: str, origin: str, size: str, columns: Columns, paired: bool = False
) -> str:
    """``columns`` of the ``[size]`` table that the benchmarks print at the end of a run, as
    Markdown; with ``paired``, the paired rounds' table of that size too."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"[{size}]")]
    if not starts:
        raise SystemExit(f"no [{size}] table in the benchmark's output:\n{output}")
    rows = [
        "| one meta-iteration | " + " | ".join(heading for heading, _ in columns) + " |",
        "| --- " * (len(columns) + 1) + "|",
    ]
    for name, values in _table(lines, starts[0], BENCH_HEADER):
        named = dict(zip(BENCH_COLUMNS, values, strict=True))
        rows.append(f"| {name} | " + " | ".join(named[column] for _, column in columns) + " |")
    text = f"{origin} (`{lines[starts[0]]}`):\n\n" + "\n".join(rows) + "\n"
    if paired:
        if len(starts) < 2:
            raise SystemExit(f"no paired rounds of [{size}] in the benchmark's output")
        rows = ["| paired rounds | median s | x first, median | min | max | rounds |",
                "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        rows += [f"| {name} | " + " | ".join(values) + " |"
                 for name, values in _table(lines, starts[1], PAIRED_HEADER)]  # fmt: skip
        text += (
            "\nThe same run's paired rounds (the three alternate round by round; each round's "
            "ratio to the first row, then their median, min and max):\n\n" + "\n".join(rows) + "\n"
        )
    return text


# -- the GPU check -----------------------------------------------------------------------
UNMEASURED = (
    "**Unmeasured.** No GPU has been lent to this project yet. On a machine with one, run "
    "`make gpu-check`, then `python scripts/docs_numbers.py --only gpu --gpu-check gpu-check` "
    "to put its table here.\n"
)


def gpu_block(folder: Path | None) -> str:
    if folder is None:
        return UNMEASURED
    table = folder / "gpu-check.md"
    if not table.is_file():
        raise SystemExit(f"{table} not found: run `make gpu-check` on the GPU machine first")
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return (
        f"What `make gpu-check` wrote into `{table.name}` (its header names the device), "
        f"copied by `python scripts/docs_numbers.py` on {today} at commit `{commit()}`:\n\n"
        f"{table.read_text().strip()}\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only", default="quickstart,counts,small",
        help=f"comma-separated names among {', '.join(NAMES)} (default: all but gpu)",
    )  # fmt: skip
    parser.add_argument(
        "--gpu-check", type=Path, metavar="DIR",
        help="folder that `make gpu-check` wrote (gpu-check.md); without it, gpu says unmeasured",
    )  # fmt: skip
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        parser.error(f"unknown names {unknown}; choose among {', '.join(NAMES)}")

    def quickstart() -> str:
        load = os.getloadavg()[0]
        output = run_quickstart()
        return quickstart_block(
            output, provenance("l2l-adversarial " + " ".join(QUICKSTART_COMMAND), load)
        )

    def benchmark(command: list[str], size: str, columns: Columns, paired: bool = False) -> str:
        load = os.getloadavg()[0]
        output = run(["-m", "pytest", *command], REPO)
        shown = " ".join(f"'{a}'" if " " in a else a for a in command)
        origin = provenance(f"pytest {shown}", load)
        return benchmark_block(output, origin, size, columns, paired)

    makers: dict[str, Callable[[], str]] = {
        "quickstart": quickstart,
        "counts": lambda: benchmark(COUNTS_COMMAND, "counts", COUNTS_COLUMNS),
        "small": lambda: benchmark(SMALL_COMMAND, "small", SMALL_COLUMNS, paired=True),
        "gpu": lambda: gpu_block(args.gpu_check),
    }
    blocks = {}
    for name in names:
        print(f"docs-numbers: {name} ...", file=sys.stderr, flush=True)
        blocks[name] = makers[name]()
    for path in write_blocks(blocks, pages()):
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
