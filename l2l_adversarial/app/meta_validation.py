"""Meta-validation during training: a fixed seeded set of validation tasks, scored every
``train.validate_every`` iterations, the best checkpoint kept beside the last, and optional
TensorBoard logging.

Every ``validate_every`` iterations (and at the last one) the learner is adapted as at
meta-test (``evaluate.inner_lr``, ``evaluate.adaptation_steps``) on the clean support set of
each of ``train.validation_tasks`` tasks, always the same ones (seed ``evaluate.seed``), and
scored on the clean query set and on the query set attacked with the training attack's radius
(FGSM at ``train.eps``, and at any further radii asked for, against theta: the paper's
protocol). One row per radius goes to ``validation.csv``; the score is the mean of the clean
and the adversarial accuracy at ``train.eps``, and
whenever it beats the best so far the learner is written to ``best.pt`` (the same format as
``checkpoint.pt``, plus the ``validation`` row), which ``evaluate --checkpoint best`` loads.

Resume stays bit-identical: validation draws no random numbers from the training streams
(it runs inside :func:`torch.random.fork_rng`), rows after the resumed checkpoint are dropped
and logged again, and the best score is read back from ``best.pt``; a validation replayed
after a resume gets the same score, so ``best.pt`` ends the same as in a run that never
stopped.

Example::

    monitor = MetaValidator(config, validation_tasks, split="validation")
    train(config, run_dir, tasks, monitor=monitor)   # writes validation.csv and best.pt
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from l2l_adversarial.app.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from l2l_adversarial.app.config import BUNDLED_DATASETS, ConfigError
from l2l_adversarial.app.factory import task_source
from l2l_adversarial.app.files import append_csv_row, drop_csv_rows_after
from l2l_adversarial.attacks import paper_attack
from l2l_adversarial.data import DatasetFileError
from l2l_adversarial.evaluation import Scenario, evaluate, few_shot_learner
from l2l_adversarial.task import Task

if TYPE_CHECKING:
    from l2l_adversarial.app.training import Trainer

__all__ = [
    "BEST_CHECKPOINT",
    "VALIDATION_FIELDS",
    "VALIDATION_LOG",
    "MetaValidator",
    "validation_monitor",
]

BEST_CHECKPOINT = "best.pt"
VALIDATION_LOG = "validation.csv"
TENSORBOARD_DIR = "tensorboard"
VALIDATION_FIELDS = (
    "iteration",
    "split",
    "epsilon",
    "clean_accuracy",
    "clean_ci95",
    "clean_loss",
    "adversarial_accuracy",
    "adversarial_ci95",
    "adversarial_loss",
    "score",
)
SCENARIOS = (Scenario(0.0, 0.0), Scenario(0.0, 1.0))
"""Clean-Clean and Clean-Adversarial: one adaptation per task serves both."""


class MetaValidator:
    """Validates a :class:`~l2l_adversarial.app.training.Trainer`'s learner while it trains.

    Args:
        config: the run's validated config (``train.validate_every``, ``train.eps``,
            ``train.tensorboard``, ``evaluate.*`` for the adaptation).
        tasks: the validation tasks (e.g. ``validation_tasks`` seeded tasks of the
            validation split), the same at every validation.
        split: the split the tasks come from, recorded in every row (``"validation"``, or
            ``"train"`` for a dataset without one, such as the bundled digits).
        epsilons: radii (pixel levels) of the adversarial query sets, one row each; default
            ``[train.eps]``; ``train.eps`` is always included, and the score is taken there.
    """

    def __init__(
        self,
        config: dict[str, Any],
        tasks: Sequence[Task],
        *,
        split: str,
        epsilons: Sequence[float] = (),
    ) -> None:
        self.config, self.tasks, self.split = config, tasks, split
        self.score_epsilon = float(config["train"]["eps"])
        self.epsilons = sorted({self.score_epsilon, *(float(e) for e in epsilons)})
        self.best_score = float("-inf")
        self.writer: Any = None
        if config["train"]["tensorboard"]:
            _summary_writer_class()  # refuse before training starts, not after

    # -- called by Trainer.run -------------------------------------------------------------
    def start(self, trainer: Trainer) -> None:
        """Before the first iteration: drop rows after the (resumed) iteration, read the best
        score so far, open TensorBoard."""
        self.best_score = float("-inf")
        if trainer.rank != 0:
            return
        drop_csv_rows_after(trainer.run_dir / VALIDATION_LOG, VALIDATION_FIELDS, trainer.iteration)
        best = trainer.run_dir / BEST_CHECKPOINT
        if trainer.iteration > 0 and best.exists():
            try:
                state = load_checkpoint(best, kind="train", expected=trainer.fingerprint())
                self.best_score = float(state["validation"]["score"])
            except (CheckpointError, KeyError, TypeError):
                self.best_score = float("-inf")  # unreadable: the next validation replaces it
        if self.config["train"]["tensorboard"]:
            self.writer = _summary_writer(trainer.run_dir / TENSORBOARD_DIR, trainer.iteration)

    def step(self, trainer: Trainer, row: Mapping[str, Any]) -> None:
        """After every iteration: TensorBoard scalars, and validation when it is due."""
        train = self.config["train"]
        iteration = trainer.iteration
        last = iteration == train["iterations"]
        if self.writer is not None and (iteration % train["log_every"] == 0 or last):
            self.writer.add_scalar("train/loss", row["loss"], iteration)
            self.writer.add_scalar("train/accuracy", 100 * row["accuracy"], iteration)
        every = train["validate_every"]
        if every is not None and (iteration % every == 0 or last):
            self.validate(trainer)

    def close(self) -> None:
        """After the last iteration (or an interruption): flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    # -- the work ----------------------------------------------------------------------------
    def validate(self, trainer: Trainer) -> list[dict[str, Any]]:
        """Score the learner now; log one row per epsilon; keep ``best.pt`` if the score (at
        ``train.eps``) improved. Returns the rows."""
        settings = self.config["evaluate"]
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            result = evaluate(
                few_shot_learner(trainer.learner, settings["inner_lr"], settings["adaptation_steps"]),
                self.tasks,
                method=self.config["method"],
                epsilons=self.epsilons,
                make_attack=paper_attack,
                scenarios=SCENARIOS,
                seed=settings["seed"],
                device=trainer.device,
                engine=settings["engine"],
                chunk_size=settings["chunk_size"],
            )  # fmt: skip
        rows: list[dict[str, Any]] = []
        for clean, adversarial in zip(result.scenarios[::2], result.scenarios[1::2], strict=True):
            rows.append(
                {
                    "iteration": trainer.iteration,
                    "split": self.split,
                    "epsilon": adversarial.epsilon,
                    "clean_accuracy": round(clean.accuracy, 4),
                    "clean_ci95": round(clean.ci95, 4),
                    "clean_loss": round(clean.loss, 6),
                    "adversarial_accuracy": round(adversarial.accuracy, 4),
                    "adversarial_ci95": round(adversarial.ci95, 4),
                    "adversarial_loss": round(adversarial.loss, 6),
                    "score": round((clean.accuracy + adversarial.accuracy) / 2, 4),
                }
            )
        scored = next(r for r in rows if r["epsilon"] == self.score_epsilon)
        if trainer.rank == 0:
            for row in rows:
                append_csv_row(trainer.run_dir / VALIDATION_LOG, VALIDATION_FIELDS, row)
            if self.writer is not None:
                for name in ("clean_accuracy", "adversarial_accuracy", "clean_loss",
                             "adversarial_loss", "score"):  # fmt: skip
                    self.writer.add_scalar(f"validation/{name}", scored[name], trainer.iteration)
        if scored["score"] > self.best_score:
            self.best_score = scored["score"]
            if trainer.rank == 0:
                state = {
                    **trainer.fingerprint(),
                    "config": trainer.config,
                    "iteration": trainer.iteration,
                    "learner": trainer.learner.state_dict(),
                    "validation": scored,
                }
                save_checkpoint(trainer.run_dir / BEST_CHECKPOINT, state, kind="train")
        return rows


def validation_monitor(
    config: dict[str, Any], epsilons: Sequence[float] = ()
) -> MetaValidator | None:
    """Meta-validation (and TensorBoard) for a run, on ``train.validation_tasks`` seeded tasks
    of the validation split (of the meta-training split for digits, which has none); ``None``
    when the config asks for neither."""
    train = config["train"]
    if train["validate_every"] is None and not train["tensorboard"]:
        return None
    split = "train" if config["dataset"]["name"] in BUNDLED_DATASETS else "validation"
    try:
        tasks = task_source(
            config, split, seed=config["evaluate"]["seed"], num_tasks=train["validation_tasks"]
        )
    except (DatasetFileError, FileNotFoundError) as error:  # a missing split file
        raise DatasetFileError(
            f"{error} (meta-validation, train.validate_every, reads the {split} split: add its "
            "file, or train without it: -o train.validate_every=null)"
        ) from error
    return MetaValidator(config, tasks, split=split, epsilons=epsilons)


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ConfigError(
            "train.tensorboard: true needs the tensorboard package: pip install "
            "'l2l-adversarial[tensorboard]' (or pip install tensorboard), or set it to false"
        ) from error
    return SummaryWriter


def _summary_writer(folder: Path, iteration: int) -> Any:
    # purge_step drops older events from this step on: those of a replaced run, or those a
    # resumed run logs again after its checkpoint
    return _summary_writer_class()(str(folder), purge_step=iteration)
