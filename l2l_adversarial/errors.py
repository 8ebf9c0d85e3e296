"""The one base class of every error a user can cause and fix (config, files, data,
checkpoints, device, disk, a busy run folder); anything else is a bug.

The command line prints a :class:`UserError` as one ``error: ...`` line and exits with
status 2; library users catch it the same way.

Example:
    >>> from l2l_adversarial.data.errors import DatasetFileError
    >>> issubclass(DatasetFileError, UserError)
    True
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["DeviceError", "TrainingDivergedError", "UserError", "describe_os_error", "naming"]


class UserError(Exception):
    """A failure the user causes and can fix; the message says what, where and how."""


class DeviceError(UserError, RuntimeError):
    """The configured device does not exist on this machine."""


class TrainingDivergedError(UserError, FloatingPointError):
    """The meta-loss or the parameters became non-finite, or the loss exploded."""


_OS_ERROR_FIXES = {
    errno.ENOSPC: "free space there and {again}",
    errno.EDQUOT: "free space in your quota and {again}",
    errno.EACCES: "check the permissions of that path, or choose another folder",
    errno.EPERM: "check the permissions of that path, or choose another folder",
    errno.EROFS: "write to a folder on a writable file system",
    errno.ENOENT: "check the path",
    errno.EISDIR: "give a file",
    errno.EEXIST: "give a folder, or move that file away",
    errno.ENOTDIR: "a part of that path is a file, not a folder; check the path",
}
_OS_ERROR_WHAT = {errno.EISDIR: "is a folder, not a file", errno.EEXIST: "is a file, not a folder"}


@contextmanager
def naming(path: object) -> Iterator[None]:
    """Within the block, an ``OSError`` that names no file (``write()``, ``fsync()``,
    ``close()`` and ``posix_fallocate()`` do not) is raised again naming ``path``.

    >>> try:
    ...     with naming("run/metrics.csv"):
    ...         raise OSError(errno.ENOSPC, "No space left on device")
    ... except OSError as error:
    ...     print(error.filename)
    run/metrics.csv
    """
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


def describe_os_error(error: OSError, again: str = "run again") -> str:
    """An ``OSError`` as ``<what>, <path>; <how to fix>`` (the command line's error line);
    ``again`` says how to continue once the disk has room (each command its own way).

    >>> describe_os_error(OSError(errno.ENOSPC, "No space left on device", "run/metrics.csv"))
    "no space left on device, 'run/metrics.csv'; free space there and run again"
    >>> describe_os_error(IsADirectoryError(errno.EISDIR, "Is a directory", "results"))
    "is a folder, not a file, 'results'; give a file"
    """
    if error.errno is None and str(error):  # raised with a message of its own: it says it all
        return str(error)
    what = (
        _OS_ERROR_WHAT.get(error.errno or 0)
        or (error.strerror or str(error) or type(error).__name__).lower()
    )
    where = repr(str(error.filename)) if error.filename is not None else "(no path given)"
    if error.filename2 is not None:
        where += f" -> {str(error.filename2)!r}"
    fix = _OS_ERROR_FIXES.get(error.errno or 0, "check the path and the disk, then run again")
    return f"{what}, {where}; {fix.format(again=again)}"
