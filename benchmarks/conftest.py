"""Shared set-up for the benchmarks: sizes, identical tasks and models, timing, peak memory,
and a summary table printed at the end of the run.

    make bench          # small, paper-1shot and paper-5shot, 3 timed rounds each
    make bench-smoke    # the tiny size, one untimed run of everything (CI)
    pytest benchmarks --bench-sizes=paper-1shot --bench-rounds=5 --bench-threads=1

Every benchmark of a size runs on the same tasks and on models with the same initial weights.
Times are seconds per call of the benchmarked function (a meta-iteration, or an attack on one
query set), on CUDA when ``torch.cuda.is_available()``, else on the CPU.

Peak memory is measured during the first (warm-up) call. On the CPU it is the increase of the
process's peak resident set size over its size just before the call (Linux: the heap is
trimmed, then VmHWM is reset through /proc/self/clear_refs and read afterwards); it counts
every byte the process touched, allocator overhead included. tracemalloc would miss it: torch
allocates tensors outside Python's allocator. On CUDA it is also
``torch.cuda.max_memory_allocated()`` above the memory allocated before the call.

On Linux with glibc, ``make bench`` sets ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``. Without
it glibc maps every tensor above 32 MB afresh (the paper size's activations are 68 MB), and
the resulting page faults (about a million per meta-iteration) took a third of the CPU
time, by an amount that depended on what ran before: rows were not comparable. With
transparent huge pages on ``madvise`` (the usual default) they fall to a few ten thousand.
"""

from __future__ import annotations

import copy
import ctypes
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture

from l2l_adversarial import CNN4, Task

SIZES_OPTION, ROUNDS_OPTION, THREADS_OPTION = "--bench-sizes", "--bench-rounds", "--bench-threads"
REFERENCE = "maml (learn2learn reference)"


@dataclass(frozen=True)
class Size:
    """One benchmark configuration: N-way K-shot tasks of ``channels x image x image`` images."""

    name: str
    ways: int
    shots: int
    queries: int  # per class
    channels: int
    image: int
    hidden: int  # CNN4 filters
    steps: int  # inner steps
    meta_batch: int


SIZES = {
    size.name: size
    for size in (
        Size("tiny", ways=3, shots=1, queries=2, channels=1, image=16, hidden=4, steps=1, meta_batch=2),
        Size("small", ways=5, shots=1, queries=15, channels=1, image=28, hidden=64, steps=5, meta_batch=4),
        Size("paper-1shot", ways=5, shots=1, queries=15, channels=3, image=84, hidden=32, steps=5, meta_batch=4),
        Size("paper-5shot", ways=5, shots=5, queries=15, channels=3, image=84, hidden=32, steps=5, meta_batch=4),
    )
}  # fmt: skip
DEFAULT_SIZES = "small,paper-1shot,paper-5shot"


@dataclass
class Row:
    size: str
    name: str
    seconds_median: float
    seconds_min: float
    rounds: int
    peak_rss_mb: float | None
    peak_cuda_mb: float | None
    images: int | None


class Workload:
    """The tasks of one size on one device, and fresh models with identical initial weights."""

    def __init__(self, size: Size, device: torch.device) -> None:
        self.size, self.device = size, device
        g = torch.Generator().manual_seed(0)
        shape = (size.channels, size.image, size.image)
        support_labels = torch.arange(size.ways).repeat_interleave(size.shots)
        query_labels = torch.arange(size.ways).repeat_interleave(size.queries)
        self.tasks = [
            Task(
                torch.rand(len(support_labels), *shape, generator=g).to(device),
                support_labels.to(device),
                torch.rand(len(query_labels), *shape, generator=g).to(device),
                query_labels.to(device),
            )
            for _ in range(size.meta_batch)
        ]
        torch.manual_seed(0)
        self._model = CNN4(size.ways, size.channels, size.hidden, size.image).to(device)

    def make_model(self) -> CNN4:
        return copy.deepcopy(self._model)


# -- options and parametrisation ---------------------------------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("l2l-adversarial benchmarks")
    group.addoption(
        SIZES_OPTION,
        default=DEFAULT_SIZES,
        help=f"comma-separated sizes among {', '.join(SIZES)} (default: {DEFAULT_SIZES})",
    )
    group.addoption(ROUNDS_OPTION, type=int, default=3, help="timed rounds per benchmark")
    group.addoption(
        THREADS_OPTION, type=int, default=None, help="torch intra-op threads (default: torch's)"
    )


def pytest_configure(config: pytest.Config) -> None:
    names = [name.strip() for name in config.getoption(SIZES_OPTION).split(",") if name.strip()]
    unknown = [name for name in names if name not in SIZES]
    if unknown or not names:
        raise pytest.UsageError(
            f"{SIZES_OPTION} got {unknown or 'nothing'}; choose among {', '.join(SIZES)}"
        )
    if config.getoption(ROUNDS_OPTION) < 1:
        raise pytest.UsageError(f"{ROUNDS_OPTION} must be >= 1")
    threads = config.getoption(THREADS_OPTION)
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError(f"{THREADS_OPTION} must be >= 1")
        torch.set_num_threads(threads)
    config.stash[_ROWS] = []


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "size" in metafunc.fixturenames:
        names = [n.strip() for n in metafunc.config.getoption(SIZES_OPTION).split(",") if n.strip()]
        metafunc.parametrize("size", [SIZES[n] for n in names], ids=names, scope="session")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def workload(size: Size, device: torch.device) -> Workload:
    return Workload(size, device)


# -- measuring ---------------------------------------------------------------------------
_ROWS = pytest.StashKey[list[Row]]()
Measure = Callable[..., None]


@pytest.fixture
def measure(
    benchmark: BenchmarkFixture, request: pytest.FixtureRequest, workload: Workload
) -> Measure:
    """``measure(name, function, images=None)``: time ``function`` and record its row.

    The first call is the warm-up and measures peak memory; then ``--bench-rounds`` timed
    rounds (none with ``--benchmark-disable``, where the warm-up time is reported).
    """
    device = workload.device

    def run(name: str, function: Callable[[], object], images: int | None = None) -> None:
        def synchronised() -> None:
            function()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        first = _FirstCallProbe(synchronised, device)
        rounds = request.config.getoption(ROUNDS_OPTION)
        benchmark.extra_info.update(size=workload.size.name, images=images)
        benchmark.pedantic(first, rounds=rounds, warmup_rounds=1, iterations=1)
        seconds = benchmark.stats.stats.data if benchmark.enabled else [first.seconds]
        request.config.stash[_ROWS].append(
            Row(
                size=workload.size.name,
                name=name,
                seconds_median=statistics.median(seconds),
                seconds_min=min(seconds),
                rounds=len(seconds),
                peak_rss_mb=first.peak_rss_mb,
                peak_cuda_mb=first.peak_cuda_mb,
                images=images,
            )
        )

    return run


class _FirstCallProbe:
    """Calls ``function``; the first call also records its duration and peak memory."""

    def __init__(self, function: Callable[[], None], device: torch.device) -> None:
        self.function, self.device = function, device
        self.seconds = float("nan")
        self.peak_rss_mb: float | None = None
        self.peak_cuda_mb: float | None = None
        self._called = False

    def __call__(self) -> None:
        if self._called:
            self.function()
            return
        self._called = True
        gc.collect()
        rss_before = _resident_mb()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            cuda_before = torch.cuda.memory_allocated(self.device)
        start = time.perf_counter()
        self.function()
        self.seconds = time.perf_counter() - start
        peak = _peak_resident_mb()
        if rss_before is not None and peak is not None:
            self.peak_rss_mb = peak - rss_before
        if self.device.type == "cuda":
            self.peak_cuda_mb = (torch.cuda.max_memory_allocated(self.device) - cuda_before) / 2**20


def _resident_mb() -> float | None:
    """Trim the C heap, reset the peak-RSS counter, return the current RSS (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM to the current RSS
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return None


def _peak_resident_mb() -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# -- the summary table -------------------------------------------------------------------
def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    write = terminalreporter.write_line
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    terminalreporter.section("l2l-adversarial benchmarks")
    write(
        f"device {device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}"
    )
    write(
        "s = seconds per call (median and min over the timed rounds); x MAML = ratio to the "
        "learn2learn MAML meta-iteration of the same size in this run; +RSS = peak resident "
        "memory above the level before the call (MB); CUDA = peak allocated (MB)"
    )
    header = f"{'benchmark':44s} {'median s':>9s} {'min s':>9s} {'rounds':>6s} {'x MAML':>7s} {'(min)':>6s} {'+RSS MB':>8s} {'CUDA MB':>8s} {'images/s':>9s}"
    for size in dict.fromkeys(row.size for row in rows):
        # meta-iterations first, then attacks
        group = sorted(
            (row for row in rows if row.size == size), key=lambda r: r.images is not None
        )
        reference = next((row for row in group if row.name == REFERENCE), None)
        write("")
        write(f"[{size}] {_describe(SIZES[size])}")
        write(header)
        for row in group:
            ratio = ratio_min = "n/a"
            if reference is not None:
                ratio = f"{row.seconds_median / reference.seconds_median:.2f}"
                ratio_min = f"{row.seconds_min / reference.seconds_min:.2f}"
            rss = "n/a" if row.peak_rss_mb is None else f"{row.peak_rss_mb:.0f}"
            cuda = "-" if row.peak_cuda_mb is None else f"{row.peak_cuda_mb:.0f}"
            throughput = "-" if row.images is None else f"{row.images / row.seconds_median:.0f}"
            write(
                f"{row.name:44s} {row.seconds_median:9.4f} {row.seconds_min:9.4f} "
                f"{row.rounds:6d} {ratio:>7s} {ratio_min:>6s} {rss:>8s} {cuda:>8s} {throughput:>9s}"
            )


def _describe(size: Size) -> str:
    return (
        f"{size.ways}-way {size.shots}-shot, {size.queries} queries/class, "
        f"{size.channels}x{size.image}x{size.image}, CNN4 hidden {size.hidden}, "
        f"{size.steps} inner steps, meta-batch {size.meta_batch}, second-order"
    )
