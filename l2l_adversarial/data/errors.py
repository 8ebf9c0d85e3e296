"""Exceptions raised by the dataset loaders: each message names the file and the fix."""

from __future__ import annotations

import pickle

from l2l_adversarial.errors import UserError

__all__ = [
    "DatasetDownloadError",
    "DatasetFileError",
    "DatasetNotFoundError",
    "UnsafePickleError",
]


class DatasetFileError(UserError, ValueError):
    """A dataset file exists but is not what it should be (corrupt, truncated, wrong content)."""


class UnsafePickleError(DatasetFileError, pickle.UnpicklingError):
    """A pickle asked for a Python object that the expected dataset format never contains."""


class DatasetDownloadError(UserError, RuntimeError):
    """Every download attempt failed; no partial file was left behind."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """No file of any known format of a dataset is where it was looked for."""
