"""Meta-training from a validated config: learner, attack, loop, logs, checkpoints, resume.

Tasks are a pure function of ``(seed, task index)`` (see :class:`TaskSource`), attacks with a
random start draw from a generator seeded by ``(seed, task index)`` before every task, and a
checkpoint holds the model, the optimizers, the iteration and every RNG state; so a run that
is killed at any point and resumed ends with the same parameters as one that never stopped.

Under ``torchrun`` (``torch.distributed`` initialised, see :mod:`l2l_adversarial.distributed`),
every rank takes every ``world_size``-th task of the meta-batch and the gradients are averaged
over the ranks before each optimizer step, so one update equals the single-process update on
the whole meta-batch; the logged loss and accuracy are means over all ranks. Only rank 0
writes the run folder; every rank reads the checkpoint on resume.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import signal
import time
from collections.abc import Callable, Collection, Generator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm import tqdm

from l2l_adversarial import __version__
from l2l_adversarial.app.checkpoint import (
    CheckpointError,
    check_finite_weights,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    seed_all,
    set_rng_state,
)
from l2l_adversarial.app.config import config_changes, describe_changes, dump_config
from l2l_adversarial.app.factory import build_learner, resolve_device
from l2l_adversarial.app.files import append_csv_row, drop_csv_rows_after, write_atomic
from l2l_adversarial.app.reproducibility import apply_deterministic_settings
from l2l_adversarial.app.run_folder import (
    RunFolderError,
    has_results,
    move_aside,
    remove_aside,
    restore_aside,
    writer_lock,
)
from l2l_adversarial.app.signals import (
    DeferredSignals,
    Interrupted,
    deferred_signals,
    interrupt_on_signals,
)
from l2l_adversarial.data.prefetch import Check, MetaBatch, MetaBatches, default_loading
from l2l_adversarial.distributed import (
    average_gradients,
    mean_over_ranks,
    on_rank0,
    world,
)
from l2l_adversarial.engines import fitting_chunk_size, meta_step, resolve_engine
from l2l_adversarial.errors import TrainingDivergedError
from l2l_adversarial.seeding import derive_seed
from l2l_adversarial.task import Task
from l2l_adversarial.validation import (
    check_meta_batch,
    check_task,
    check_task_metadata,
    value_checks,
    value_checks_enabled,
)

__all__ = [
    "RunFolderError",
    "TaskSource",
    "build_learner",
    "check_values",
    "resolve_device",
    "train",
]

CHECKPOINT = "checkpoint.pt"
METRIC_FIELDS = ("iteration", "loss", "accuracy", "seconds", "data_seconds", "engine")
"""``seconds``: since the start (or resume); ``data_seconds``: waited for tasks since the last
row; ``engine``: the engine that ran (:mod:`l2l_adversarial.engines`)."""
ATTACK_STREAM = 2
"""Key of a training task's attack seed: ``derive_seed(seed, task_index, ATTACK_STREAM)``."""


class TrainingMonitor(Protocol):
    """Watches a run: ``start`` before the first iteration (after a resume too), ``step``
    after every iteration, ``close`` at the end (see
    :class:`l2l_adversarial.app.meta_validation.MetaValidator`)."""

    def start(self, trainer: Trainer) -> None: ...

    def step(self, trainer: Trainer, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class TaskSource(Protocol):
    """Where tasks come from: ``source[index]`` is a pure function of its seed and ``index``
    (as for :class:`l2l_adversarial.data.FewShotTasks`)."""

    def __getitem__(self, index: int) -> Task: ...


def check_values(learner: nn.Module) -> Check:
    """The value checks :func:`~l2l_adversarial.engines.meta_step` makes of a meta-batch
    (finite inputs, labels in range, inputs inside the attack's ``data_range``), for the data
    pipeline to run where it builds the meta-batch (:class:`MetaBatches`' ``check``).

    Host tasks are checked in host memory, before their copy to the device: the training loop
    reads nothing. Tasks built on the device (``dataset.device_resident``) are read there, by
    the thread that builds them (which then waits for the device; the loop does not). A bad
    task is refused with the error ``meta_step`` would raise, naming its global task index.

    Example:
        >>> import torch, l2l_adversarial as l2la
        >>> check = check_values(l2la.MAML(torch.nn.Linear(2, 2), lr=0.1))
        >>> bad = l2la.Task(torch.rand(2, 2), torch.tensor([0, 1]),
        ...                 torch.rand(2, 2), torch.tensor([0, 2]))
        >>> check([(8, bad)])
        Traceback (most recent call last):
        ...
        ValueError: training task 8: query_labels must lie in [0, 2) for a 2-way task, ...
    """
    attack = getattr(learner, "attack", None)
    data_range = None if attack is None else attack.input_range
    ways = getattr(learner, "ways", None)  # a learner of fixed ways (Matching Networks) says so
    classification = getattr(learner, "classification", True)  # Matching Networks: classes
    return functools.partial(
        _check_values, classification=classification, data_range=data_range, ways=ways,
        enabled=value_checks_enabled(),  # this thread's setting, in whichever builds the batch
    )  # fmt: skip


def _check_values(
    batch: MetaBatch,
    classification: bool,
    data_range: tuple[float, float] | None,
    ways: int | None,
    enabled: bool,
) -> None:
    """:func:`check_values`' check (a function of plain values: worker processes take it)."""
    names = [f"training task {index}" for index, _ in batch]
    with value_checks(enabled):
        tasks = [
            check_task_metadata(task, classification, where=name)
            for name, (_, task) in zip(names, batch, strict=True)
        ]
        if ways is None:
            check_meta_batch(tasks, classification, data_range, names=names)
            return
        for name, task in zip(names, tasks, strict=True):  # Matching Networks: [0, ways)
            try:
                check_task(*task, ways=ways, classification=classification)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None


class _AllReduceOptimizer:
    """Averages gradients over the ranks of a process group before stepping."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> None:
        average_gradients(p for group in self.optimizer.param_groups for p in group["params"])
        self.optimizer.step()


class Trainer:
    """One meta-training run in ``run_dir`` (see :func:`train`)."""

    after_save: Callable[[], None] | None = None
    """Called after every checkpoint written (e.g. to drop the results it replaces)."""
    saved_iteration: int | None = None
    """The iteration of the checkpoint in the run folder (``None``: none yet)."""

    def __init__(
        self,
        config: dict[str, Any],
        run_dir: Path,
        tasks: TaskSource,
        learner: nn.Module,
        device: torch.device,
    ) -> None:
        self.config, self.run_dir, self.tasks = config, run_dir, tasks
        self.learner, self.device = learner.to(device), device
        self.rank, self.world_size = world()
        train = config["train"]
        if train["meta_batch_size"] % self.world_size:
            raise ValueError(
                f"train.meta_batch_size={train['meta_batch_size']} must be a multiple of the "
                f"number of processes ({self.world_size}) so every rank takes the same share"
            )
        self.optimizers = [torch.optim.Adam(learner.parameters(), lr=train["meta_lr"])]
        self.sequential = train["meta_update"] == "sequential"  # ADML's only (the config)
        if self.sequential:
            clean_lr = train["clean_meta_lr"] or train["meta_lr"]
            self.optimizers.append(torch.optim.Adam(learner.parameters(), lr=clean_lr))
        self.engine = resolve_engine(learner, train["engine"])
        """The engine that runs (``train.engine`` resolved), recorded in metrics and summary."""
        self.chunk_size: int | None = None
        """The vmap engine's tasks per chunk: ``None`` (the whole meta-batch) until a
        meta-batch ran out of device memory (:func:`~l2l_adversarial.engines.fitting_chunk_size`);
        kept in the checkpoint, so that a resumed run batches as the first one did."""
        self.iteration = 0
        workers, prefetch = default_loading(tasks, device)
        #: (worker processes, meta-batches built ahead): see :mod:`l2l_adversarial.data.prefetch`.
        self.loading: tuple[int, int] = (
            workers if train["workers"] is None else train["workers"],
            prefetch if train["prefetch"] is None else train["prefetch"],
        )
        self.data_seconds = 0.0  # waited for meta-batches since the last logged row
        self._batches: Generator[MetaBatch, None, None] | None = None
        self._next_batch = -1
        self._stepping = False  # inside an iteration (see run)

    # -- state ---------------------------------------------------------------------------
    def fingerprint(self) -> dict[str, Any]:
        return {
            "method": self.config["method"],
            "task": self.config["task"],
            "parameter_shapes": {k: list(v.shape) for k, v in self.learner.state_dict().items()},
        }

    def save(self) -> None:
        if self.rank != 0:
            return
        state = {
            **self.fingerprint(),
            "config": self.config,
            "package_version": __version__,
            "iteration": self.iteration,
            "learner": self.learner.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "rng": rng_state(),
            "chunk_size": self.chunk_size,
        }
        save_checkpoint(self.run_dir / CHECKPOINT, state, kind="train")
        self.saved_iteration = self.iteration
        if self.after_save is not None:
            self.after_save()

    def restore(self, accept_changes: Collection[str] = ()) -> dict[str, tuple[Any, Any]]:
        """Continue from the run folder's checkpoint; return the config changes accepted.

        A change of any setting that alters training (see
        :func:`l2l_adversarial.app.config.config_changes`), or of the package version, is refused
        unless ``accept_changes`` names it; accepted learning rates replace the saved ones.
        """
        path = self.run_dir / CHECKPOINT
        state = load_checkpoint(path, kind="train", expected=self.fingerprint())
        check_finite_weights(path, state["learner"])
        changes = config_changes(state["config"], self.config)
        if state["package_version"] != __version__:
            changes["package_version"] = (state["package_version"], __version__)
        refused = {key: change for key, change in changes.items() if key not in accept_changes}
        if refused:
            raise CheckpointError(
                f"resuming with a changed config, {str(path)!r} was trained with other "
                f"settings ({describe_changes(refused)}); pass --accept-changes "
                f"{','.join(refused)} to continue with the new values, or --overwrite to start "
                "over"
            )
        unknown = sorted(set(accept_changes) - changes.keys())
        if unknown:
            raise CheckpointError(
                f"--accept-changes names {', '.join(unknown)}, which did not change, for "
                f"{str(path)!r}; name only changed keys ({', '.join(changes) or 'none'})"
            )
        self.learner.load_state_dict(state["learner"])
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for optimizer, lr in zip(self.optimizers, self._learning_rates(), strict=True):
            for group in optimizer.param_groups:
                group["lr"] = lr
        set_rng_state(state["rng"])
        self.iteration = self.saved_iteration = int(state["iteration"])
        self.chunk_size = state.get("chunk_size")  # absent in checkpoints before it existed
        return changes

    def _learning_rates(self) -> list[float]:
        """The configured rate of each optimizer (the saved state holds the old ones)."""
        train = self.config["train"]
        rates = [train["meta_lr"]]
        if self.sequential:
            rates.append(train["clean_meta_lr"] or train["meta_lr"])
        return rates

    # -- logs ----------------------------------------------------------------------------
    def _metrics_path(self) -> Path:
        return self.run_dir / "metrics.csv"

    def _log(self, row: dict[str, float | str]) -> None:
        path = self._metrics_path()
        append_csv_row(path, METRIC_FIELDS, row)

    # -- the loop ------------------------------------------------------------------------
    def _task_indices(self, iteration: int) -> range:
        """This rank's share of the global task indices of ``iteration``'s meta-batch."""
        size = self.config["train"]["meta_batch_size"]
        return range(iteration * size + self.rank, (iteration + 1) * size, self.world_size)

    def _meta_batch(self, iteration: int) -> MetaBatch:
        """This rank's share of the meta-batch: (global task index, task on the device), built
        ahead by :class:`MetaBatches`; the time spent waiting for it adds to ``data_seconds``."""
        waiting = time.perf_counter()
        if self._batches is None or iteration != self._next_batch:
            self.close_batches()
            workers, prefetch = self.loading
            stop = max(self.config["train"]["iterations"], iteration + 1)
            self._batches = MetaBatches(
                self.tasks, self._task_indices, iteration, stop, device=self.device,
                workers=workers, prefetch=prefetch, check=check_values(self.learner),
            ).__iter__()  # fmt: skip
        batch = next(self._batches)
        self._next_batch = iteration + 1
        self.data_seconds += time.perf_counter() - waiting
        return batch

    def close_batches(self) -> None:
        """Stop building meta-batches ahead (the thread or the worker processes)."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

    def _seeded(self, batch: list[tuple[int, Task]]) -> Iterator[Task]:
        """The tasks of ``batch``, the attack's random start seeded from the global task index
        just before each is used: a task gets the same random start on whichever rank."""
        generator = getattr(getattr(self.learner, "attack", None), "generator", None)
        for index, task in batch:
            if generator is not None:
                generator.manual_seed(derive_seed(self.config["seed"], index, ATTACK_STREAM))
            yield task

    def _optimizers(self) -> Sequence[Any]:
        if self.world_size == 1:
            return self.optimizers
        return [_AllReduceOptimizer(o) for o in self.optimizers]

    def step(self) -> tuple[Tensor, Tensor]:
        """One meta-iteration through :func:`l2l_adversarial.engines.meta_step`; returns this
        rank's mean meta-loss and query accuracy as device tensors (not read: no sync).

        The meta-batch's values were checked where it was built (:func:`check_values`), so
        ``meta_step`` runs with value checks off: it reads nothing on the host."""
        batch = self._meta_batch(self.iteration)
        with value_checks(False):
            objective = meta_step(
                self.learner, self._seeded(batch), *self._optimizers(), engine=self.engine,
                chunk_size=self.chunk_size,
            )  # fmt: skip
        self.chunk_size = fitting_chunk_size(self.learner) or self.chunk_size
        return objective.total, objective.accuracy

    def run(
        self,
        progress: bool = True,
        on_iteration: Callable[[int], None] | None = None,
        monitor: TrainingMonitor | None = None,
    ) -> dict[str, float | str]:
        """Meta-train up to ``train.iterations``: log, validate (``monitor``) and checkpoint
        when due; a signal stops it between iterations with a checkpoint
        (:class:`~l2l_adversarial.app.signals.Interrupted`). Returns the last logged row."""
        bar = tqdm(
            total=self.config["train"]["iterations"],
            initial=self.iteration,
            desc=f"train {self.config['method']}",
            disable=not progress or self.rank != 0,
            dynamic_ncols=True,
        )
        started = time.perf_counter()
        if monitor is not None:
            monitor.start(self)
        self._stepping = False  # inside an iteration: its state is half updated
        with deferred_signals() as stop:  # a signal stops the loop between iterations
            try:
                last = self._loop(stop, bar, started, on_iteration, monitor)
            except KeyboardInterrupt as interrupt:
                bar.close()
                raise self._interrupted(interrupt, saved=not self._stepping) from None
            finally:
                self.close_batches()
                if monitor is not None:
                    monitor.close()
        bar.close()
        return last

    def _loop(
        self,
        stop: DeferredSignals,
        bar: tqdm,
        started: float,
        on_iteration: Callable[[int], None] | None,
        monitor: TrainingMonitor | None,
    ) -> dict[str, float | str]:
        """:meth:`run`'s iterations, until the last or a signal (``stop.signum``)."""
        last: dict[str, float | str] = {}
        while self.iteration < self.config["train"]["iterations"]:
            if stop.signum is not None:
                raise Interrupted(signum=stop.signum)
            if on_iteration is not None:
                on_iteration(self.iteration)
            self._stepping = True
            last, checkpoint_due = self._advance(bar, started, last)
            if monitor is not None:
                monitor.step(self, last)
            if checkpoint_due:
                self.save()
            self._stepping = False
        return last

    def _advance(
        self, bar: tqdm, started: float, last: dict[str, float | str]
    ) -> tuple[dict[str, float | str], bool]:
        """One meta-iteration, its row logged when due; returns the latest row (``last``
        unless this one was read) and whether a checkpoint is due."""
        train = self.config["train"]
        total = train["iterations"]
        loss, accuracy = self.step()
        logged = (self.iteration + 1) % train["log_every"] == 0
        saved = (self.iteration + 1) % train["checkpoint_every"] == 0
        if logged or saved or self.iteration + 1 == total:
            last = self._read_row(loss, accuracy, started)
            bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.3f}")
        self.iteration += 1
        bar.update(1)
        if logged or self.iteration == total:
            if self.rank == 0:
                self._log(last)
            self.data_seconds = 0.0
        return last, saved or self.iteration == total

    def _read_row(self, loss: Tensor, accuracy: Tensor, started: float) -> dict[str, float | str]:
        """The metrics row of the iteration that just ran: loss and accuracy read (a
        host-device sync, done only when logged or checkpointed) and averaged over the
        ranks, checked for divergence before any checkpoint."""
        mean_loss, mean_accuracy = mean_over_ranks(
            torch.stack([loss.detach(), accuracy.float()]).tolist()
        )
        self._guard_divergence(mean_loss)
        return {"iteration": self.iteration + 1, "loss": mean_loss, "accuracy": mean_accuracy,
                "seconds": round(time.perf_counter() - started, 3),
                "data_seconds": round(self.data_seconds, 4), "engine": self.engine}  # fmt: skip

    def _interrupted(self, interrupt: KeyboardInterrupt, saved: bool) -> Interrupted:
        """Save a checkpoint between iterations (not inside one, where a second signal
        lands); say where the run can continue from."""
        signum = getattr(interrupt, "signum", signal.SIGINT)
        name = signal.Signals(signum).name
        if saved:
            self.save()
            where = f"after iteration {self.iteration}, checkpoint saved in"
        else:
            where = (
                f"during iteration {self.iteration + 1}, the checkpoint of iteration "
                f"{self.saved_iteration} is kept in"
            )
        return Interrupted(
            f"interrupted ({name}) {where} {str(self.run_dir / CHECKPOINT)!r}; continue with "
            "--resume",
            signum,
        )

    def _guard_divergence(self, loss: float) -> None:
        """Stop before a non-finite or exploding step can reach a checkpoint."""
        train = self.config["train"]
        limit = train["max_loss"]
        finite = math.isfinite(loss) and all(
            bool(torch.isfinite(p).all()) for p in self.learner.parameters()
        )
        if finite and (limit is None or loss <= limit):
            return
        problem = (
            f"the meta-loss became {loss:g}"
            if not math.isfinite(loss)
            else "the parameters became non-finite"
            if not finite
            else f"the meta-loss {loss:g} exceeds train.max_loss={limit:g}"
        )
        kept = (
            "no checkpoint was written"
            if self.saved_iteration is None
            else f"the checkpoint of iteration {self.saved_iteration} is kept"
        )
        raise TrainingDivergedError(
            f"training diverged, {problem} at iteration {self.iteration + 1} in "
            f"{str(self.run_dir)!r}; lower train.meta_lr (now {train['meta_lr']:g}) or "
            f"train.inner_lr (now {train['inner_lr']:g}), or raise train.max_loss; {kept}"
        )


def prepare_run_dir(
    run_dir: Path,
    config: dict[str, Any],
    resume: bool,
    overwrite: bool,
    changes: dict[str, tuple[Any, Any]] | None = None,
    iteration: int = 0,
) -> Path | None:
    """Make ``run_dir`` ready for a run whose settings were all checked; return the folder
    the old results were moved aside into (``None`` if none).

    Call under the folder's writer lock. Results (a checkpoint, summary or evaluation) are
    only replaced with ``overwrite``, and then moved aside, not deleted; a folder left by a
    run killed before its first checkpoint is started again. On resume, metrics logged after
    the checkpoint are dropped and config.yaml records the accepted ``changes``.
    """
    if resume:
        drop_csv_rows_after(run_dir / "metrics.csv", METRIC_FIELDS, iteration)
        if changes:
            header = "".join(
                f"# resumed at iteration {iteration} accepting {key}: {old!r} -> {new!r}\n"
                for key, (old, new) in changes.items()
            )
            previous = (run_dir / "config.yaml").read_text(encoding="utf-8")
            history = "".join(line + "\n" for line in previous.splitlines() if line.startswith("#"))
            write_atomic(run_dir / "config.yaml", history + header + dump_config(config))
        return None
    if has_results(run_dir) and not overwrite:
        raise RunFolderError(
            f"run folder {str(run_dir)!r} already holds results; pass --resume to continue that "
            "run, --overwrite to replace it, or choose another run_dir"
        )
    aside = move_aside(run_dir)
    try:
        write_atomic(run_dir / "config.yaml", dump_config(config))
    except BaseException:
        if aside is not None:
            restore_aside(run_dir, aside)
        raise
    return aside


def train(
    config: dict[str, Any],
    run_dir: str | Path,
    tasks: TaskSource,
    *,
    resume: bool = False,
    overwrite: bool = False,
    accept_changes: Collection[str] = (),
    progress: bool = True,
    on_iteration: Callable[[int], None] | None = None,
    monitor: TrainingMonitor | None = None,
) -> nn.Module:
    """Meta-train the configured method on ``tasks``; return the trained learner.

    Writes ``config.yaml``, ``metrics.csv``, ``checkpoint.pt`` and ``summary.json`` into
    ``run_dir`` (rank 0 only, holding the folder's writer lock). Everything (device, model,
    the checkpoint to resume and its settings) is checked before any file is touched;
    replaced results are moved aside and deleted once the new run's first checkpoint is
    written, or put back if it fails before. SIGTERM and SIGUSR1 stop it like Ctrl-C:
    checkpoint saved, :class:`~l2l_adversarial.app.signals.Interrupted` raised. ``monitor`` (e.g. a
    :class:`~l2l_adversarial.app.meta_validation.MetaValidator`) adds its own files.
    """
    run_dir = Path(run_dir)
    trainer = _build_trainer(config, run_dir, tasks)
    with contextlib.ExitStack() as stack:
        stack.enter_context(interrupt_on_signals())
        on_rank0(lambda: stack.enter_context(writer_lock(run_dir, "train")))
        changes = _restore(trainer, accept_changes) if resume else {}
        aside = _prepare_on_rank0(trainer, resume, overwrite, changes)
        summary = _run_replacing(trainer, aside, progress, on_iteration, monitor)
        if trainer.rank == 0 and summary:  # nothing ran: a finished run keeps its summary
            write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    return trainer.learner


def _build_trainer(config: dict[str, Any], run_dir: Path, tasks: TaskSource) -> Trainer:
    """The run's trainer: device set up, seeded, the learner built for ``tasks``' images;
    nothing on disk touched yet."""
    device = resolve_device(config["device"])
    apply_deterministic_settings(device, config["train"]["deterministic"])
    seed_all(config["seed"])
    shape = tasks[0].support_inputs.shape
    return Trainer(config, run_dir, tasks, build_learner(config, shape[1], shape[-1]), device)


def _restore(trainer: Trainer, accept_changes: Collection[str]) -> dict[str, tuple[Any, Any]]:
    """``--resume``: the run folder's checkpoint restored; returns the accepted changes."""
    if not (trainer.run_dir / CHECKPOINT).exists():
        raise CheckpointError(
            f"--resume: no checkpoint in {str(trainer.run_dir)!r} to resume from (the run "
            "stopped before its first checkpoint, or never ran); run it again without --resume"
        )
    return trainer.restore(accept_changes)


def _prepare_on_rank0(
    trainer: Trainer, resume: bool, overwrite: bool, changes: dict[str, tuple[Any, Any]]
) -> Path | None:
    """:func:`prepare_run_dir` on rank 0 (every rank raises its error); returns the folder
    the old results were moved aside into (``None``: none, or not rank 0)."""
    prepared: list[Path | None] = [None]

    def prepare() -> None:
        prepared[0] = prepare_run_dir(
            trainer.run_dir, trainer.config, resume, overwrite, changes, trainer.iteration
        )

    on_rank0(prepare)
    return prepared[0]


def _run_replacing(
    trainer: Trainer,
    aside: Path | None,
    progress: bool,
    on_iteration: Callable[[int], None] | None,
    monitor: TrainingMonitor | None,
) -> dict[str, float | str]:
    """Run the trainer; old results moved ``aside`` are deleted once its first checkpoint
    is written, or put back if it fails before."""
    if aside is not None:

        def drop_old_results() -> None:
            remove_aside(aside)
            trainer.after_save = None

        trainer.after_save = drop_old_results
    try:
        return trainer.run(progress=progress, on_iteration=on_iteration, monitor=monitor)
    except BaseException:
        if trainer.after_save is not None and aside is not None:  # no new checkpoint yet
            restore_aside(trainer.run_dir, aside)
        raise
