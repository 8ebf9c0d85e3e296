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

__all__ = ["DeviceError", "TrainingDivergedError", "UserError", "describe_os_error"]


class UserError(Exception):
    """A failure the user causes and can fix; the message says what, where and how."""


class DeviceError(UserError, RuntimeError):
    """The configured device does not exist on this machine."""


class TrainingDivergedError(UserError, FloatingPointError):
    """The meta-loss or the parameters became non-finite, or the loss exploded."""


_OS_ERROR_FIXES = {
    errno.ENOSPC: "free space there and run again (the files written before are kept; "
    "train continues with --resume)",
    errno.EDQUOT: "free space in your quota and run again (train continues with --resume)",
    errno.EACCES: "check the permissions of that path, or choose another folder",
    errno.EPERM: "check the permissions of that path, or choose another folder",
    errno.EROFS: "write to a folder on a writable file system",
    errno.ENOENT: "check the path",
    errno.EISDIR: "give a file, not a folder",
    errno.ENOTDIR: "a part of that path is a file, not a folder; check the path",
}


def describe_os_error(error: OSError) -> str:
    """An ``OSError`` as ``<what>, <path>; <how to fix>`` (the command line's error line).

    >>> describe_os_error(OSError(errno.ENOSPC, "No space left on device", "run/checkpoint.pt"))
    "no space left on device, 'run/checkpoint.pt'; free space there and run again (the files written before are kept; train continues with --resume)"
    """
    if error.errno is None and str(error):  # raised with a message of its own: it says it all
        return str(error)
    what = (error.strerror or str(error) or type(error).__name__).lower()
    where = repr(str(error.filename)) if error.filename is not None else "(no path given)"
    if error.filename2 is not None:
        where += f" -> {str(error.filename2)!r}"
    fix = _OS_ERROR_FIXES.get(error.errno or 0, "check the path and the disk, then run again")
    return f"{what}, {where}; {fix}"
