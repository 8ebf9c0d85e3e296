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

import csv
import io
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from l2l_adversarial.algorithms import ADML, MAML, MAMLAD, AdversarialQuerying, MatchingNetwork
from l2l_adversarial.attacks import FFGSM, FGSM, PGD, Attack
from l2l_adversarial.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from l2l_adversarial.config import METHODS, dump_config
from l2l_adversarial.distributed import (
    average_gradients,
    cuda_device,
    mean_over_ranks,
    on_rank0,
    world,
)
from l2l_adversarial.models import CNN4
from l2l_adversarial.report import write_atomic
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


class RunFolderError(RuntimeError):
    """The run folder holds another run's results that would be overwritten."""


class TrainingMonitor(Protocol):
    """Watches a run: ``start`` before the first iteration (after a resume too), ``step``
    after every iteration, ``close`` at the end (see
    :class:`l2l_adversarial.meta_validation.MetaValidator`)."""

    def start(self, trainer: Trainer) -> None: ...

    def step(self, trainer: Trainer, row: dict[str, float]) -> None: ...

    def close(self) -> None: ...


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
        raise RuntimeError(
            f"device {name!r} was asked for but CUDA is not available; use device=auto or cpu"
        )
    return cuda_device() if device.type == "cuda" and device.index is None else device


def build_attack(name: str, eps_255: float, pgd_steps: int, seed: int | None = None) -> Attack:
    """The attack named in a config, eps given in 8-bit pixel levels (``2`` -> 2/255)."""
    eps = eps_255 / 255
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    if name == "fgsm":
        return FGSM(eps=eps)
    if name == "ffgsm":
        return FFGSM(eps=eps, generator=generator)
    if name == "pgd":
        return PGD(eps=eps, steps=pgd_steps, generator=generator)
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
            "iteration": self.iteration,
            "learner": self.learner.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "rng": rng_state(),
        }
        save_checkpoint(self.run_dir / CHECKPOINT, state, kind="train")

    def restore(self) -> None:
        state = load_checkpoint(
            self.run_dir / CHECKPOINT, kind="train", expected=self.fingerprint()
        )
        self.learner.load_state_dict(state["learner"])
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        set_rng_state(state["rng"])
        self.iteration = int(state["iteration"])
        if self.rank == 0:
            self._truncate_metrics(self.iteration)

    # -- logs ----------------------------------------------------------------------------
    def _metrics_path(self) -> Path:
        return self.run_dir / "metrics.csv"

    def _truncate_metrics(self, iteration: int) -> None:
        """Drop rows logged after the checkpoint: the resumed run logs them again."""
        path = self._metrics_path()
        if not path.exists():
            return
        rows = [r for r in csv.DictReader(path.open()) if int(r["iteration"]) <= iteration]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(path, buffer.getvalue())

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
        self,
        progress: bool = True,
        on_iteration: Callable[[int], None] | None = None,
        monitor: TrainingMonitor | None = None,
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
        if monitor is not None:
            monitor.start(self)
        try:
            while self.iteration < total:
                if on_iteration is not None:
                    on_iteration(self.iteration)
                loss, accuracy = self.step()
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"meta-loss became {loss} at iteration {self.iteration}; lower "
                        "train.meta_lr or train.inner_lr, or resume from the last checkpoint"
                    )
                self.iteration += 1
                bar.update(1)
                last = {"iteration": self.iteration, "loss": loss, "accuracy": accuracy,
                        "seconds": round(time.perf_counter() - started, 3)}  # fmt: skip
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}")
                if self.rank == 0 and (
                    self.iteration % train["log_every"] == 0 or self.iteration == total
                ):
                    self._log(last)
                if monitor is not None:
                    monitor.step(self, last)
                if self.iteration % train["checkpoint_every"] == 0 or self.iteration == total:
                    self.save()
        except KeyboardInterrupt:
            self.save()
            bar.close()
            raise KeyboardInterrupt(
                f"interrupted after iteration {self.iteration}; checkpoint saved in "
                f"{self.run_dir / CHECKPOINT}; continue with --resume"
            ) from None
        finally:
            if monitor is not None:
                monitor.close()
        bar.close()
        return last


def prepare_run_dir(run_dir: Path, config: dict[str, Any], resume: bool, overwrite: bool) -> None:
    """Create the run folder; refuse to overwrite another run's results unless asked."""
    has_results = run_dir.exists() and any(run_dir.iterdir())
    if resume:
        if not (run_dir / CHECKPOINT).exists():
            raise CheckpointError(f"--resume: no checkpoint in {str(run_dir)!r} to resume from")
        return
    if has_results and not overwrite:
        raise RunFolderError(
            f"run folder {str(run_dir)!r} already holds results; pass --resume to continue that "
            "run, --overwrite to replace it, or choose another run_dir"
        )
    if has_results:
        for name in (CHECKPOINT, "metrics.csv", "config.yaml", "summary.json", "evaluation.json",
                     "best.pt", "validation.csv"):  # fmt: skip
            (run_dir / name).unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / "config.yaml", dump_config(config))


def train(
    config: dict[str, Any],
    run_dir: str | Path,
    tasks: TaskSource,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_iteration: Callable[[int], None] | None = None,
    monitor: TrainingMonitor | None = None,
) -> nn.Module:
    """Meta-train the configured method on ``tasks``; return the trained learner.

    Writes ``config.yaml``, ``metrics.csv``, ``checkpoint.pt`` and ``summary.json`` into
    ``run_dir`` (rank 0 only); ``monitor`` (e.g. a
    :class:`~l2l_adversarial.meta_validation.MetaValidator`) adds its own files.
    """
    run_dir = Path(run_dir)
    rank, _ = world()
    on_rank0(lambda: prepare_run_dir(run_dir, config, resume, overwrite))
    device = resolve_device(config["device"])
    torch.manual_seed(config["seed"])
    sample = tasks[0]
    shape = sample.support_inputs.shape
    trainer = Trainer(config, run_dir, tasks, build_learner(config, shape[1], shape[-1]), device)
    if resume:
        trainer.restore()
    summary = trainer.run(progress=progress, on_iteration=on_iteration, monitor=monitor)
    if rank == 0:
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    return trainer.learner
