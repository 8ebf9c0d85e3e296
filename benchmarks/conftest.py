"""Shared set-up for the benchmarks: sizes, identical tasks and models, timing, peak memory,
and a summary table printed at the end of the run.

    make bench          # small, paper-1shot and paper-5shot, 3 timed rounds each
    make bench-smoke    # the tiny size, one untimed run of everything (CI)
    pytest benchmarks --bench-sizes=paper-1shot --bench-rounds=5 --bench-threads=1

Every benchmark of a size runs on the same tasks and on models with the same initial weights.
Times are seconds per call of the benchmarked function (a meta-iteration, or an attack on one
query set), on CUDA when ``torch.cuda.is_available()``, else on the CPU.

Peak memory and floating-point operations are measured during the first (warm-up) call.

Peak memory on the CPU is the increase of the process's peak resident set size over its size
just before the call (Linux: the heap is trimmed, then VmHWM is reset through
/proc/self/clear_refs and read afterwards); it counts every byte the process touched,
allocator overhead included. tracemalloc would miss it: torch allocates tensors outside
Python's allocator. On CUDA it is also ``torch.cuda.max_memory_allocated()`` above the memory
allocated before the call.

FLOPs are those of convolutions and matrix products, second-order passes included, counted by
a dispatch mode (:class:`_FlopCounter`): the arithmetic a method needs, whatever the machine;
their ratio to MAML's is the ratio a time measurement would show if every operation ran at the
same speed in both.

On the CPU the C allocator matters. glibc maps every block above 32 MB afresh (the paper
size's activations are 68 MB), and each new mapping costs page faults and zeroing, by an
amount that depended on what ran before. (An ad-hoc ``getrusage`` count, not part of this
suite, gave about a million minor faults per ADML meta-iteration with glibc's defaults and a
few hundred per task with tcmalloc.) ``make bench`` therefore preloads tcmalloc when it is
installed (Debian: ``apt-get install libtcmalloc-minimal4``), which reuses freed memory, and
otherwise sets ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (transparent huge pages). The
table's header names the allocator in use. GPU runs use PyTorch's caching allocator either
way.
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
from typing import Any

import pytest
import torch
from pytest_benchmark.fixture import BenchmarkFixture
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import flop_registry

from l2l_adversarial import CNN4, Task

from .op_counter import OpCounter

SIZES_OPTION, ROUNDS_OPTION, THREADS_OPTION = "--bench-sizes", "--bench-rounds", "--bench-threads"
PAIRED_ROUNDS_OPTION = "--bench-paired-rounds"
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
        # issue 11's counting configuration at the smallest images: op and sync counts do not
        # depend on image size or width, so its counts are paper-1shot's at a fraction of the time
        Size("counts", ways=5, shots=1, queries=15, channels=1, image=16, hidden=4, steps=5, meta_batch=4),
        Size("small", ways=5, shots=1, queries=15, channels=1, image=28, hidden=64, steps=5, meta_batch=4),
        Size("paper-1shot", ways=5, shots=1, queries=15, channels=3, image=84, hidden=32, steps=5, meta_batch=4),
        Size("paper-5shot", ways=5, shots=5, queries=15, channels=3, image=84, hidden=32, steps=5, meta_batch=4),
    )
}  # fmt: skip
DEFAULT_SIZES = "small,paper-1shot,paper-5shot"


@dataclass
class PairedRow:
    size: str
    group: str  # the first function's name: the rows measured together
    name: str
    seconds_median: float
    ratios: list[float]  # per round, to the first function of the same round


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
    flops: int | None
    ops: int | None = None  # ATen operator calls in the warm-up call (see op_counter.py)
    launches: int | None = None  # those that are not views (kernel launches on CUDA)
    syncs: int | None = None  # host-device synchronising calls among them


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
        PAIRED_ROUNDS_OPTION, type=int, default=6, help="timed rounds of the paired benchmark"
    )
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
    for option in (ROUNDS_OPTION, PAIRED_ROUNDS_OPTION):
        if config.getoption(option) < 1:
            raise pytest.UsageError(f"{option} must be >= 1")
    threads = config.getoption(THREADS_OPTION)
    if threads is not None:
        if threads < 1:
            raise pytest.UsageError(f"{THREADS_OPTION} must be >= 1")
        torch.set_num_threads(threads)
    config.stash[_ROWS] = []
    config.stash[_PAIRED] = []


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
        first = _FirstCallProbe(lambda: _call_synchronised(function, device), device)
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
                flops=first.flops,
                ops=first.ops,
                launches=first.launches,
                syncs=first.syncs,
            )
        )

    return run


_PAIRED = pytest.StashKey[list[PairedRow]]()
MeasurePaired = Callable[[dict[str, Callable[[], object]]], None]


@pytest.fixture
def measure_paired(
    benchmark: BenchmarkFixture, request: pytest.FixtureRequest, workload: Workload
) -> MeasurePaired:
    """``measure_paired({name: function, ...})``: time the functions in alternating rounds.

    Each round calls every function once, in an order that rotates from round to round, after
    one warm-up round; each function's ratio to the first one is taken within a round, so a
    slow spell of a shared machine affects both sides of a ratio. The summary reports the
    median, min and max of those per-round ratios (``--bench-paired-rounds`` rounds).
    """
    device = workload.device

    def run(functions: dict[str, Callable[[], object]]) -> None:
        names = list(functions)
        seconds: dict[str, list[float]] = {name: [] for name in names}

        def one_round() -> None:
            shift = len(seconds[names[0]]) % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                _call_synchronised(functions[name], device)
                seconds[name].append(time.perf_counter() - start)

        rounds = request.config.getoption(PAIRED_ROUNDS_OPTION)
        benchmark.extra_info.update(size=workload.size.name, paired=names)
        benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=1, iterations=1)
        timed = {name: values[1:] or values for name, values in seconds.items()}  # drop warm-up
        first = timed[names[0]]
        request.config.stash[_PAIRED].extend(
            PairedRow(
                size=workload.size.name,
                group=names[0],
                name=name,
                seconds_median=statistics.median(values),
                ratios=[value / reference for value, reference in zip(values, first, strict=True)],
            )
            for name, values in timed.items()
        )

    return run


def _call_synchronised(function: Callable[[], object], device: torch.device) -> None:
    """Call ``function`` and wait for the GPU work it queued (timings must include it)."""
    function()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _FlopCounter(TorchDispatchMode):
    """Counts the FLOPs of convolutions (forward and backward) and matrix products.

    Matrix products use ``torch.utils.flop_counter``'s formulas. Convolutions are counted
    here: that module's backward formula ignores ``groups`` for the weight gradient (it
    counted the vmap engine's grouped convolutions ``groups`` times over). Its
    ``FlopCounterMode`` also tracks modules with backward hooks, which
    ``torch.autograd.grad`` on leaves (every inner step) refuses.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in (torch.ops.aten.convolution, torch.ops.aten._convolution):
            inputs, weight, transposed = args[0], args[1], args[6]
            self.total += _convolution_flops(inputs if transposed else out, weight)
        elif packet is torch.ops.aten.convolution_backward:
            grad_output, inputs, weight, transposed, mask = (
                args[0], args[1], args[2], args[7], args[-1]
            )  # fmt: skip
            forward = _convolution_flops(inputs if transposed else grad_output, weight)
            self.total += forward * (int(mask[0]) + int(mask[1]))
        elif packet in flop_registry:
            shapes, kw, out_shape = tree_map(_shape, (args, kwargs, out))
            self.total += flop_registry[packet](*shapes, **kw, out_val=out_shape)
        return out


def _shape(value: Any) -> Any:
    """A tensor's shape (what ``flop_registry``'s formulas take), anything else unchanged."""
    return value.shape if isinstance(value, torch.Tensor) else value


def _convolution_flops(larger: torch.Tensor, weight: torch.Tensor) -> int:
    """2 x multiply-adds of a convolution: each element of the larger side (the output of a
    convolution, the input of a transposed one) sums in_channels/groups x kernel products."""
    return 2 * larger.numel() * weight[0].numel()


class _FirstCallProbe:
    """Calls ``function``; the first call also records its duration, peak memory and FLOPs."""

    def __init__(self, function: Callable[[], None], device: torch.device) -> None:
        self.function, self.device = function, device
        self.seconds = float("nan")
        self.peak_rss_mb: float | None = None
        self.peak_cuda_mb: float | None = None
        self.flops: int | None = None
        self.ops: int | None = None
        self.launches: int | None = None
        self.syncs: int | None = None
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
        counter, ops = _FlopCounter(), OpCounter()
        start = time.perf_counter()
        with counter, ops:
            self.function()
        self.seconds = time.perf_counter() - start
        self.flops, self.ops, self.syncs = counter.total, ops.ops, ops.syncs
        self.launches = ops.launches
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
    rows, paired = config.stash.get(_ROWS, []), config.stash.get(_PAIRED, [])
    if not rows and not paired:
        return
    write = terminalreporter.write_line
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    terminalreporter.section("l2l-adversarial benchmarks")
    write(
        f"device {device} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
        f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, "
        f"allocator: {_allocator()}"
    )
    write(
        "s = seconds per call (median and min over the timed rounds); x MAML = ratio to the "
        "learn2learn MAML meta-iteration of the same size in this run; GFLOP = convolution and "
        "matrix-product arithmetic per call, and its ratio to MAML's; +RSS = peak resident "
        "memory above the level before the call (MB); CUDA = peak allocated (MB); ops = ATen "
        "operator calls of the first call, and their ratio to MAML's; launch = those that are "
        "not views (kernel launches on CUDA), and their ratio; syncs = host-device synchronising calls among them (benchmarks/op_counter.py)"
    )
    header = f"{'benchmark':52s} {'median s':>9s} {'min s':>9s} {'rounds':>6s} {'x MAML':>7s} {'(min)':>6s} {'GFLOP':>7s} {'(x)':>5s} {'+RSS MB':>8s} {'CUDA MB':>8s} {'images/s':>9s} {'ops':>7s} {'(x)':>5s} {'launch':>7s} {'(x)':>5s} {'syncs':>5s}"
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
            ratio = ratio_min = flop_ratio = "n/a"
            if reference is not None:
                ratio = f"{row.seconds_median / reference.seconds_median:.2f}"
                ratio_min = f"{row.seconds_min / reference.seconds_min:.2f}"
                if row.flops and reference.flops:
                    flop_ratio = f"{row.flops / reference.flops:.2f}"
            gflop = "n/a" if row.flops is None else f"{row.flops / 1e9:.1f}"
            rss = "n/a" if row.peak_rss_mb is None else f"{row.peak_rss_mb:.0f}"
            cuda = "-" if row.peak_cuda_mb is None else f"{row.peak_cuda_mb:.0f}"
            throughput = "-" if row.images is None else f"{row.images / row.seconds_median:.0f}"
            ops = "n/a" if row.ops is None else str(row.ops)
            op_ratio = "n/a"
            if reference is not None and row.ops and reference.ops:
                op_ratio = f"{row.ops / reference.ops:.2f}"
            syncs = "n/a" if row.syncs is None else str(row.syncs)
            launches = "n/a" if row.launches is None else str(row.launches)
            launch_ratio = "n/a"
            if reference is not None and row.launches and reference.launches:
                launch_ratio = f"{row.launches / reference.launches:.2f}"
            write(
                f"{row.name:52s} {row.seconds_median:9.4f} {row.seconds_min:9.4f} "
                f"{row.rounds:6d} {ratio:>7s} {ratio_min:>6s} {gflop:>7s} {flop_ratio:>5s} "
                f"{rss:>8s} {cuda:>8s} {throughput:>9s} {ops:>7s} {op_ratio:>5s} "
                f"{launches:>7s} {launch_ratio:>5s} {syncs:>5s}"
            )
    if paired:
        _write_paired(write, paired)


def _write_paired(write: Callable[[str], None], rows: list[PairedRow]) -> None:
    write("")
    write(
        "paired rounds: the functions alternate round by round (rotating order); x first = "
        "median (min-max) of the per-round ratios to the first row"
    )
    for size in dict.fromkeys(row.size for row in rows):
        write(f"[{size}] {_describe(SIZES[size])}")
        write(
            f"{'benchmark':52s} {'median s':>9s} {'x first':>8s} {'min':>6s} {'max':>6s} {'rounds':>6s}"
        )
        for group in dict.fromkeys(row.group for row in rows if row.size == size):
            for row in (row for row in rows if row.size == size and row.group == group):
                write(
                    f"{row.name:52s} {row.seconds_median:9.4f} "
                    f"{statistics.median(row.ratios):8.2f} {min(row.ratios):6.2f} "
                    f"{max(row.ratios):6.2f} {len(row.ratios):6d}"
                )
            write("")


def _allocator() -> str:
    preloaded = [
        name for name in os.environ.get("LD_PRELOAD", "").split() if "malloc" in name
    ]  # fmt: skip
    if preloaded:
        return "preloaded " + ", ".join(os.path.basename(name) for name in preloaded)
    return f"default (GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r})"


def _describe(size: Size) -> str:
    return (
        f"{size.ways}-way {size.shots}-shot, {size.queries} queries/class, "
        f"{size.channels}x{size.image}x{size.image}, CNN4 hidden {size.hidden}, "
        f"{size.steps} inner steps, meta-batch {size.meta_batch}, second-order"
    )
