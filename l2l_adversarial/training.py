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
import csv
import io
import json
import math
import signal
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from l2l_adversarial import __version__
from l2l_adversarial.algorithms import ADML, MAML, MAMLAD, AdversarialQuerying, MatchingNetwork
from l2l_adversarial.attacks import FFGSM, FGSM, PGD, Attack
from l2l_adversarial.checkpoint import (
    CheckpointError,
    check_finite_weights,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from l2l_adversarial.config import METHODS, config_changes, dump_config
from l2l_adversarial.distributed import (
    average_gradients,
    cuda_device,
    mean_over_ranks,
    on_rank0,
    world,
)
from l2l_adversarial.errors import DeviceError, TrainingDivergedError
from l2l_adversarial.models import CNN4
from l2l_adversarial.report import write_atomic
from l2l_adversarial.run_folder import (
    RunFolderError,
    has_results,
    move_aside,
    remove_aside,
    restore_aside,
    writer_lock,
)
from l2l_adversarial.signals import Interrupted, deferred_signals, interrupt_on_signals
from l2l_adversarial.task import Task
from l2l_adversarial.transforms import derive_seed

__all__ = [
    "RunFolderError",
    "TaskSource",
    "build_attack",
    "build_learner",
    "resolve_device",
    "train",
]

CHECKPOINT = "checkpoint.pt"
METRIC_FIELDS = ("iteration", "loss", "accuracy", "seconds")
ATTACK_STREAM = 2
"""Key of a training task's attack seed: ``derive_seed(seed, task_index, ATTACK_STREAM)``."""


class TaskSource(Protocol):
    """Where tasks come from: ``source[index]`` is a pure function of its seed and ``index``
    (as for :class:`l2l_adversarial.data.FewShotTasks`)."""

    def __getitem__(self, index: int) -> Task: ...


def resolve_device(name: str) -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; ``"cuda"`` without a GPU is an error.

    ``"auto"`` and ``"cuda"`` mean this process's GPU: ``cuda:LOCAL_RANK`` under torchrun.
    """
    if name == "auto":
        return cuda_device() if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"device {name!r} is not available, CUDA is missing on this machine (config key "
            "device); use device=auto or device=cpu"
        )
    return cuda_device() if device.type == "cuda" and device.index is None else device


def build_attack(name: str, eps_255: float, pgd_steps: int, seed: int | None = None) -> Attack:
    """The attack named in a config, eps given in 8-bit pixel levels (``2`` -> 2/255).

    Its per-call value checks are off (``check_values=False``): the data was validated when
    loaded, and training's divergence guard stops a non-finite loss once per iteration with
    the setting to change, where a diverged inner loop would make the attack raise instead.
    """
    eps = eps_255 / 255
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    if name == "fgsm":
        return FGSM(eps=eps, check_values=False)
    if name == "ffgsm":
        return FFGSM(eps=eps, generator=generator, check_values=False)
    if name == "pgd":
        return PGD(eps=eps, steps=pgd_steps, generator=generator, check_values=False)
    raise ValueError(f"attack must be one of 'fgsm', 'ffgsm', 'pgd'; got {name!r}")


def build_learner(config: dict[str, Any], in_channels: int, image_size: int) -> nn.Module:
    """The configured meta-learner around the paper's 4-layer CNN (its embedding for
    Matching Networks), for ``in_channels`` x ``image_size`` x ``image_size`` images."""
    method, train, ways, hidden = (
        config["method"], config["train"], config["task"]["ways"], config["model"]["hidden"]
    )  # fmt: skip
    if method == "matching-nets":
        return MatchingNetwork(
            ways=ways, in_channels=in_channels, image_size=image_size, hidden=hidden,
            fce=config["model"]["fce"],
        )  # fmt: skip
    model = CNN4(ways=ways, in_channels=in_channels, hidden=hidden, image_size=image_size)
    channels_last = train["channels_last"]
    if channels_last is None:  # on when training on the CPU ("cuda" must not need a GPU here)
        device = config["device"]
        channels_last = device == "cpu" or (
            device == "auto" and resolve_device(device).type == "cpu"
        )
    common = {
        "lr": train["inner_lr"],
        "first_order": train["first_order"],
        "adaptation_steps": train["adaptation_steps"],
        "channels_last": channels_last,
    }
    if method == "maml":
        return MAML(model, **common)
    attack = build_attack(train["attack"], train["eps"], train["pgd_steps"], seed=config["seed"])
    if method == "adml":
        return ADML(
            model,
            **common,
            attack=attack,
            clean_lr=train["clean_inner_lr"],
            attack_target=train["attack_target"] or "initial",
        )
    if method == "maml-ad":
        return MAMLAD(
            model, **common, attack=attack, adversarial_fraction=train["adversarial_fraction"]
        )
    if method == "aq":
        return AdversarialQuerying(
            model, **common, attack=attack, attack_target=train["attack_target"] or "adapted"
        )
    raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")


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
        self.sequential = config["method"] == "adml" and train["meta_update"] == "sequential"
        if self.sequential:
            clean_lr = train["clean_meta_lr"] or train["meta_lr"]
            self.optimizers.append(torch.optim.Adam(learner.parameters(), lr=clean_lr))
        self.iteration = 0

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
        }
        save_checkpoint(self.run_dir / CHECKPOINT, state, kind="train")
        self.saved_iteration = self.iteration
        if self.after_save is not None:
            self.after_save()

    def restore(self, accept_changes: Collection[str] = ()) -> dict[str, tuple[Any, Any]]:
        """Continue from the run folder's checkpoint; return the config changes accepted.

        A change of any setting that alters training (see
        :func:`l2l_adversarial.config.config_changes`), or of the package version, is refused
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
            listed = "\n  ".join(
                f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in refused.items()
            )
            raise CheckpointError(
                f"resuming with a changed config, {str(path)!r} was trained with other "
                f"settings; pass --accept-changes {','.join(refused)} to continue with the new "
                f"values, or --overwrite to start over:\n  {listed}"
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

    def _log(self, row: dict[str, float]) -> None:
        path = self._metrics_path()
        new = not path.exists()
        with path.open("a", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=METRIC_FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)

    # -- the loop ------------------------------------------------------------------------
    def _meta_batch(self, iteration: int) -> list[tuple[int, Task]]:
        """This rank's share of the meta-batch: (global task index, task on the device)."""
        size = self.config["train"]["meta_batch_size"]
        indices = range(iteration * size + self.rank, (iteration + 1) * size, self.world_size)
        return [(i, Task(*(t.to(self.device) for t in self.tasks[i]))) for i in indices]

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

    def step(self) -> tuple[float, float]:
        """One meta-iteration; returns the meta-loss and query accuracy, means over the whole
        meta-batch (all ranks)."""
        batch = self._meta_batch(self.iteration)
        optimizers = self._optimizers()
        if self.sequential:
            assert isinstance(self.learner, ADML)
            objective = self.learner.meta_step(self._seeded(batch), optimizers[0], optimizers[1])
            loss, accuracy = objective.total.item(), objective.accuracy.item()
        else:
            optimizer = optimizers[0]
            optimizer.zero_grad()
            losses, accuracies = [], []
            for task in self._seeded(batch):
                task_loss, task_accuracy = self.learner.loss_and_accuracy(*task)  # type: ignore[operator]
                (task_loss / len(batch)).backward()
                losses.append(task_loss.detach())
                accuracies.append(task_accuracy.detach())
            optimizer.step()
            loss = torch.stack(losses).mean().item()
            accuracy = torch.stack(accuracies).float().mean().item()
        loss, accuracy = mean_over_ranks([loss, accuracy])
        return loss, accuracy

    def run(
        self, progress: bool = True, on_iteration: Callable[[int], None] | None = None
    ) -> dict[str, float]:
        train = self.config["train"]
        total = train["iterations"]
        bar = tqdm(
            total=total,
            initial=self.iteration,
            desc=f"train {self.config['method']}",
            disable=not progress or self.rank != 0,
            dynamic_ncols=True,
        )
        last: dict[str, float] = {}
        started = time.perf_counter()
        stepping = False  # inside an iteration: its state is half updated
        with deferred_signals() as stop:  # a signal stops the loop between iterations
            try:
                while self.iteration < total:
                    if stop.signum is not None:
                        raise Interrupted(signum=stop.signum)
                    if on_iteration is not None:
                        on_iteration(self.iteration)
                    stepping = True
                    loss, accuracy = self.step()
                    self._guard_divergence(loss)
                    self.iteration += 1
                    bar.update(1)
                    last = {"iteration": self.iteration, "loss": loss, "accuracy": accuracy,
                            "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
                    bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}")
                    if self.rank == 0 and (
                        self.iteration % train["log_every"] == 0 or self.iteration == total
                    ):
                        self._log(last)
                    if self.iteration % train["checkpoint_every"] == 0 or self.iteration == total:
                        self.save()
                    stepping = False
            except KeyboardInterrupt as interrupt:
                bar.close()
                raise self._interrupted(interrupt, saved=not stepping) from None
        bar.close()
        return last

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
        _truncate_metrics(run_dir / "metrics.csv", iteration)
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


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop rows logged after the checkpoint: the resumed run logs them again."""
    if not path.exists():
        return
    with path.open(newline="") as file:
        logged = list(csv.DictReader(file))
    rows = [r for r in logged if int(r["iteration"]) <= iteration]
    if len(rows) == len(logged):
        return
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buffer.getvalue())


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
) -> nn.Module:
    """Meta-train the configured method on ``tasks``; return the trained learner.

    Writes ``config.yaml``, ``metrics.csv``, ``checkpoint.pt`` and ``summary.json`` into
    ``run_dir`` (rank 0 only, holding the folder's writer lock). Everything (device, model,
    the checkpoint to resume and its settings) is checked before any file is touched;
    replaced results are moved aside and deleted once the new run's first checkpoint is
    written, or put back if it fails before. SIGTERM and SIGUSR1 stop it like Ctrl-C:
    checkpoint saved, :class:`~l2l_adversarial.signals.Interrupted` raised.
    """
    run_dir = Path(run_dir)
    rank, _ = world()
    device = resolve_device(config["device"])
    torch.manual_seed(config["seed"])
    sample = tasks[0]
    shape = sample.support_inputs.shape
    trainer = Trainer(config, run_dir, tasks, build_learner(config, shape[1], shape[-1]), device)
    with contextlib.ExitStack() as stack:
        stack.enter_context(interrupt_on_signals())
        on_rank0(lambda: stack.enter_context(writer_lock(run_dir, "train")))
        if resume and not (run_dir / CHECKPOINT).exists():
            raise CheckpointError(
                f"--resume: no checkpoint in {str(run_dir)!r} to resume from (the run stopped "
                "before its first checkpoint, or never ran); run it again without --resume"
            )
        changes = trainer.restore(accept_changes) if resume else {}
        prepared: list[Path | None] = [None]

        def prepare() -> None:
            prepared[0] = prepare_run_dir(
                run_dir, config, resume, overwrite, changes, trainer.iteration
            )

        on_rank0(prepare)
        aside = prepared[0]
        if aside is not None:

            def drop_old_results() -> None:
                remove_aside(aside)
                trainer.after_save = None

            trainer.after_save = drop_old_results
        try:
            summary = trainer.run(progress=progress, on_iteration=on_iteration)
        except BaseException:
            if trainer.after_save is not None and aside is not None:  # no new checkpoint yet
                restore_aside(run_dir, aside)
            raise
        if rank == 0 and summary:  # nothing ran: a finished run keeps its summary
            write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    return trainer.learner
