"""Load dataset pickles without running code: only numpy arrays and plain containers pass.

``pickle.load`` runs whatever callable a file names, so a tampered dataset file could run
``os.system``. :func:`safe_load` refuses every global except the handful that numpy arrays
need (under both numpy 1.x ``numpy.core`` and numpy 2.x ``numpy._core`` names) and
``_codecs.encode`` (how Python 3 writes ``bytes`` at pickle protocol 2). Dicts, lists,
tuples, strings, bytes and numbers need no global and always pass.

Example::

    data = safe_load("mini-imagenet-cache-test.pkl")
    images = data["image_data"]
"""

from __future__ import annotations

import codecs
import importlib
import os
import pickle
from pathlib import Path
from typing import IO, Any

import numpy as np

from l2l_adversarial.data.errors import DatasetFileError, UnsafePickleError

__all__ = ["ALLOWED_GLOBALS", "python2_text", "safe_load"]

_NUMPY_FUNCTIONS = (
    ("multiarray", "_reconstruct"),
    ("multiarray", "scalar"),
    ("numeric", "_frombuffer"),
)

#: Every ``(module, name)`` a pickle may ask for; anything else raises UnsafePickleError.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        (f"{package}.{submodule}", name)
        for package in ("numpy.core", "numpy._core")
        for submodule, name in _NUMPY_FUNCTIONS
    }
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
)

_DEFAULT_HINT = "Obtain the file again from its official source."


def _numpy_function(submodule: str, name: str) -> Any:
    """Find a numpy internal under its numpy 2.x home first, then its numpy 1.x one."""
    for package in ("numpy._core", "numpy.core"):
        try:
            module = importlib.import_module(f"{package}.{submodule}")
        except ImportError:
            continue
        if hasattr(module, name):
            return getattr(module, name)
    raise ImportError(f"this numpy ({np.__version__}) has no {submodule}.{name}")


def _resolve(module: str, name: str) -> Any:
    if module == "numpy":
        return {"ndarray": np.ndarray, "dtype": np.dtype}[name]
    if module == "_codecs":
        return codecs.encode
    return _numpy_function(module.rsplit(".", 1)[1], name)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], *, path: Path, encoding: str, hint: str) -> None:
        super().__init__(file, encoding=encoding)
        self._path = path
        self._hint = hint

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"Refused to load {self._path}: it tries to load {module}.{name}, which this "
                "dataset format never contains. The file may be malicious or is not the "
                f"expected dataset; do not open it with plain pickle. {self._hint}"
            )
        return _resolve(module, name)


def _check_header(path: Path, head: bytes, hint: str) -> None:
    if not head:
        raise DatasetFileError(
            f"{path} is empty (0 bytes): an interrupted download. Delete it and download it "
            f"again. {hint}"
        )
    if head.lstrip().startswith(b"<"):
        raise DatasetFileError(
            f"{path} is an HTML page, not a pickle (pickle would say \"invalid load key, '<'\"): "
            "the download failed and saved the server's web page instead, as Google Drive does "
            f"for large files. Delete it and download it again. {hint}"
        )


def safe_load(
    path: str | os.PathLike[str], *, encoding: str = "ASCII", how_to_obtain: str | None = None
) -> Any:
    """Unpickle ``path`` allowing only numpy arrays, containers, strings, bytes and numbers.

    ``encoding`` is passed to :class:`pickle.Unpickler`: ``"bytes"`` reads Python 2 pickles
    (such as CIFAR-100's) with their ``str`` as ``bytes``. ``how_to_obtain`` ends every error
    message: say where a good copy of the file comes from.

    Raises ``FileNotFoundError`` if the file is missing, :class:`UnsafePickleError` if it asks
    for any other global, and :class:`DatasetFileError` if it is empty, an HTML page,
    truncated or not a pickle.

    Example::

        meta = safe_load("cifar-100-python/meta", encoding="bytes")
        names = meta[b"fine_label_names"]
    """
    path = Path(path)
    hint = how_to_obtain or _DEFAULT_HINT
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file. {hint}")
    with path.open("rb") as file:
        _check_header(path, file.read(64), hint)
        file.seek(0)
        try:
            return _RestrictedUnpickler(file, path=path, encoding=encoding, hint=hint).load()
        except UnsafePickleError:
            raise
        except (EOFError, pickle.UnpicklingError, ValueError, TypeError, MemoryError) as err:
            raise DatasetFileError(
                f"{path} is truncated or not a pickle ({type(err).__name__}: {err}): an "
                f"interrupted download or a different file. Delete it and download it again. "
                f"{hint}"
            ) from err


def python2_text(value: Any) -> Any:
    """A Python 2 pickle read with ``encoding="bytes"``: byte-string dict keys, and byte
    strings in lists of names, as latin-1 text (as ``encoding="latin1"`` would give).

    ``encoding="bytes"`` keeps numpy arrays' data as bytes: ``"latin1"`` first decodes it
    into a ``str`` that numpy encodes back, holding every array twice while loading.

    >>> python2_text({b"data": 1, b"names": [b"a", b"b"]})
    {'data': 1, 'names': ['a', 'b']}
    """
    if isinstance(value, dict):
        return {
            (key.decode("latin-1") if isinstance(key, bytes) else key): python2_text(item)
            for key, item in value.items()
        }
    if isinstance(value, list) and value and all(isinstance(item, bytes) for item in value[:8]):
        if all(len(item) < 256 for item in value[:8]):  # names, not encoded images
            return [item.decode("latin-1") if isinstance(item, bytes) else item for item in value]
    return value
