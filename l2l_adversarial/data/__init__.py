"""Datasets of the ADML paper and reproducible few-shot tasks.

- :class:`MiniImageNet`: 64 / 16 / 20 classes, from learn2learn's pickles, torchmeta's hdf5,
  MetaOptNet's pickles or Ravi & Larochelle's csv + JPEG images (auto-detected).
- :class:`CIFAR100Meta`: CIFAR-100 split 64 / 16 / 20 (``split="paper"`` or ``"cifar-fs"``).
- :class:`CIFARFS`, :class:`FC100`: from MetaOptNet's pickles or torchvision's CIFAR-100.
- :class:`TieredImageNet`: the PNG-bytes pickles; :class:`Omniglot`: torchvision's folders;
  :class:`ImageFolderSplit`: your own ``root/<class>/<images>``.
- :class:`Digits`: scikit-learn's bundled digits, a no-download quickstart.
- :class:`FewShotTasks` / :func:`fixed_tasks`: N-way K-shot tasks with a query set from any
  labelled dataset, task ``i`` reproducible from ``(seed, i)``.
- :func:`load_dataset` / :func:`make_tasks`: the same by dataset name.

Dataset pickles are read with :func:`safe_load`, which refuses anything but numpy arrays and
plain containers. Image datasets are decoded once into a memory-mapped uint8 cache
(:mod:`l2l_adversarial.data.cache`); docs/data-formats.md describes every format.

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
from l2l_adversarial.data.cifar_fs import CIFARFS, FC100, few_shot_cifar_split
from l2l_adversarial.data.digits import Digits
from l2l_adversarial.data.errors import (
    DatasetDownloadError,
    DatasetFileError,
    DatasetNotFoundError,
    UnsafePickleError,
)
from l2l_adversarial.data.folders import ImageFolderSplit, Omniglot
from l2l_adversarial.data.mini_imagenet import MiniImageNet
from l2l_adversarial.data.registry import (
    DATASET_INFO,
    DATASETS,
    DatasetInfo,
    load_dataset,
    make_tasks,
)
from l2l_adversarial.data.safe_pickle import ALLOWED_GLOBALS, safe_load
from l2l_adversarial.data.split import ImageSplit
from l2l_adversarial.data.tasks import FewShotTasks, as_meta_dataset, fixed_tasks
from l2l_adversarial.data.tiered_imagenet import TieredImageNet

__all__ = [
    "ALLOWED_GLOBALS",
    "CIFAR100Meta",
    "CIFARFS",
    "DATASETS",
    "DATASET_INFO",
    "DatasetDownloadError",
    "DatasetFileError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "Digits",
    "FC100",
    "FewShotTasks",
    "ImageFolderSplit",
    "ImageSplit",
    "MiniImageNet",
    "Omniglot",
    "TieredImageNet",
    "PAPER_SPLIT_SEED",
    "SPLITS",
    "UnsafePickleError",
    "as_meta_dataset",
    "few_shot_cifar_split",
    "fixed_tasks",
    "load_class_split",
    "load_dataset",
    "make_tasks",
    "random_class_split",
    "safe_load",
]
