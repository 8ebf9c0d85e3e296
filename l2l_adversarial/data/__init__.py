"""Datasets of the ADML paper and reproducible few-shot tasks.

- :class:`MiniImageNet`: learn2learn's mini-ImageNet cache pickles (64 / 16 / 20 classes).
- :class:`CIFAR100Meta`: CIFAR-100 split 64 / 16 / 20 (``split="paper"`` or ``"cifar-fs"``).
- :class:`Digits`: scikit-learn's bundled digits, a no-download quickstart.
- :class:`FewShotTasks` / :func:`fixed_tasks`: N-way K-shot tasks with a query set from any
  labelled dataset, task ``i`` reproducible from ``(seed, i)``.
- :func:`load_dataset` / :func:`make_tasks`: the same by dataset name.

Dataset pickles are read with :func:`safe_load`, which refuses anything but numpy arrays and
plain containers.

Example::

    from l2l_adversarial.data import make_tasks

    tasks = make_tasks("digits", None, "train", ways=5, shots=1, query_shots=15, seed=0)
    support_x, support_y, query_x, query_y = tasks.sample()
"""

from l2l_adversarial.data.cifar100 import (
    PAPER_SPLIT_SEED,
    SPLITS,
    CIFAR100Meta,
    load_class_split,
    random_class_split,
)
from l2l_adversarial.data.digits import Digits
from l2l_adversarial.data.errors import DatasetDownloadError, DatasetFileError, UnsafePickleError
from l2l_adversarial.data.mini_imagenet import MiniImageNet
from l2l_adversarial.data.registry import DATASETS, load_dataset, make_tasks
from l2l_adversarial.data.safe_pickle import ALLOWED_GLOBALS, safe_load
from l2l_adversarial.data.tasks import FewShotTasks, as_meta_dataset, fixed_tasks

__all__ = [
    "ALLOWED_GLOBALS",
    "CIFAR100Meta",
    "DATASETS",
    "DatasetDownloadError",
    "DatasetFileError",
    "Digits",
    "FewShotTasks",
    "MiniImageNet",
    "PAPER_SPLIT_SEED",
    "SPLITS",
    "UnsafePickleError",
    "as_meta_dataset",
    "fixed_tasks",
    "load_class_split",
    "load_dataset",
    "make_tasks",
    "random_class_split",
    "safe_load",
]
