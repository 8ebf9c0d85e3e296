"""Decode a split once into a uint8 N x C x H x W file, then memory-map it on every later load.

Every image dataset of this package (except the small in-memory CIFAR-100 and digits) goes
through :func:`load_decoded`: a reader describes its source (the class name of every item, the
image shape, and a lazy iterator over the decoded items), and the split is written once to
``<cache folder>/<key>.images.npy`` (numpy's ``.npy`` format, opened with
``numpy.load(mmap_mode="r")``), ``<key>.targets.npy`` and ``<key>.json`` (the manifest, written
last). The images are stored in the layout the tasks need (C x H x W), so nothing is transposed
or copied afterwards: the operating system pages rows in as tasks gather them.

Row order (the same whatever the source format): classes sorted by name are labels 0..C-1 and
their rows come in label order; within a class, rows are ordered by the BLAKE2b digest of their
decoded C x H x W bytes, so two sources holding the same pixels give the same rows, and so the
same tasks for the same seed, however each file orders its images.

The manifest records every source file (relative path, size, modification time) and a SHA-256
digest of their contents, the images file's size and a digest of 64 blocks spread over it, and
the targets' digest. A cache whose sources changed (size, or content digest when the
modification time moved), whose files were truncated or altered, or whose manifest is missing
or unreadable is rebuilt with a warning that says why; it is never trusted silently.

Example::

    decoded = load_decoded(key="mini-imagenet-test-learn2learn", root=root, sources=[path],
                           plan=lambda: read_plan(path), cache_dir=cache_folder(root, None))
    decoded.images.shape  # (12000, 3, 84, 84), a read-only memory map
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from l2l_adversarial.data.errors import DatasetFileError
from l2l_adversarial.errors import naming

__all__ = ["CACHE_FOLDER", "Decoded", "Plan", "cache_folder", "load_decoded"]

_log = logging.getLogger(__name__)

#: The cache folder's name inside a dataset root (the default place of the cache).
CACHE_FOLDER = ".l2l-adversarial-cache"
_VERSION = 1
_SAMPLES, _BLOCK = 64, 1 << 16


@dataclass
class Plan:
    """A source, read far enough to know its items but not decoded yet."""

    #: class name of every item, in source order
    names: list[str]
    #: (C, H, W) of every decoded item
    shape: tuple[int, int, int]
    #: the decoded items (uint8 C x H x W), in source order; iterated once
    items: Iterable[np.ndarray]
    #: what the progress bar says, e.g. "decoding mini-ImageNet train (ravi)"
    what: str


@dataclass
class Decoded:
    """A decoded split: ``images[i]`` is row i (uint8 C x H x W), ``targets[i]`` its label."""

    images: np.ndarray
    targets: np.ndarray
    classes: list[str]
    #: the images file, or None when decoded into memory (``cache_dir=False``)
    cache_path: Path | None


def cache_folder(root: Path, cache_dir: str | os.PathLike[str] | bool | None) -> Path | None:
    """Where the cache of a dataset under ``root`` lives.

    ``cache_dir=None``: ``root/.l2l-adversarial-cache`` when ``root`` is writable, else
    ``~/.cache/l2l-adversarial/<digest of root>`` (or under ``$XDG_CACHE_HOME``); a path: that
    folder; ``False``: no cache file, the split is decoded into memory on every load.
    """
    if cache_dir is False:
        return None
    if cache_dir is True or cache_dir is None:
        beside = root / CACHE_FOLDER
        if (beside.is_dir() and os.access(beside, os.W_OK)) or os.access(root, os.W_OK):
            return beside
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        return base / "l2l-adversarial" / digest
    return Path(cache_dir).expanduser()


def _stat_listing(root: Path, sources: list[Path]) -> list[list[object]]:
    listing: list[list[object]] = []
    for path in sources:
        stat = path.stat()
        listing.append([os.path.relpath(path, root), stat.st_size, stat.st_mtime_ns])
    return listing


def _content_digest(sources: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sources:
        with path.open("rb") as file:
            while chunk := file.read(1 << 22):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def _sampled_digest(path: Path) -> str:
    """SHA-256 of the size and 64 blocks of 64 KiB spread evenly over the file."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as file:
        for offset in np.linspace(0, max(size - _BLOCK, 0), _SAMPLES, dtype=np.int64):
            file.seek(int(offset))
            digest.update(file.read(_BLOCK))
    return digest.hexdigest()


def _array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _paths(folder: Path, key: str) -> tuple[Path, Path, Path]:
    return folder / f"{key}.images.npy", folder / f"{key}.targets.npy", folder / f"{key}.json"


def _open_cache(
    folder: Path, key: str, root: Path, sources: list[Path]
) -> tuple[Decoded | None, str]:
    """The cache if it matches its sources, else (None, why it does not)."""
    images_path, targets_path, manifest_path = _paths(folder, key)
    if not manifest_path.is_file():
        return None, "no cache yet"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("version") != _VERSION or manifest.get("key") != key:
            return None, f"the manifest {manifest_path} is of another version or dataset"
        listing = _stat_listing(root, sources)
        if [entry[:2] for entry in listing] != [entry[:2] for entry in manifest["sources"]]:
            return None, "the source files changed (names or sizes differ from the manifest)"
        if listing != manifest["sources"]:  # same sizes, touched since: compare the contents
            if _content_digest(sources) != manifest["content_sha256"]:
                return None, "the source files' contents changed (SHA-256 differs)"
            manifest["sources"] = listing
            _write_text(manifest_path, json.dumps(manifest))
        shape = tuple(manifest["shape"])
        if images_path.stat().st_size != manifest["images_size"]:
            return None, f"{images_path} has the wrong size (truncated or replaced)"
        if _sampled_digest(images_path) != manifest["images_sampled_sha256"]:
            return None, f"{images_path} was altered (its sampled SHA-256 differs)"
        images = np.load(images_path, mmap_mode="r", allow_pickle=False)
        targets = np.load(targets_path, allow_pickle=False)
        if images.shape != shape or images.dtype != np.uint8:
            return None, f"{images_path} holds {images.dtype} {images.shape}, not uint8 {shape}"
        if targets.shape != shape[:1] or _array_digest(targets) != manifest["targets_sha256"]:
            return None, f"{targets_path} was altered (its SHA-256 differs)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"the cache could not be read ({type(err).__name__}: {err})"
    targets.setflags(write=False)
    return Decoded(images, targets, list(manifest["classes"]), images_path), ""


def _write_text(path: Path, text: str) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(temporary, path)


def _reserve(path: Path) -> None:
    """Allocate the disk blocks of the (sparse) file at ``path``: a full disk then raises
    ``OSError`` here, where writing through a memory map would kill the process (SIGBUS)."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        return
    with path.open("r+b") as file:
        try:
            os.posix_fallocate(file.fileno(), 0, path.stat().st_size)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # a file system without it
                raise


def _fill(plan: Plan, out: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Decode ``plan`` into ``out`` in canonical row order; return (targets, classes)."""
    classes = sorted(set(plan.names))
    label_of = {name: label for label, name in enumerate(classes)}
    labels = np.fromiter((label_of[name] for name in plan.names), np.int64, len(plan.names))
    order = np.argsort(labels, kind="stable")
    destination = np.empty_like(order)
    destination[order] = np.arange(len(order))
    digests = np.empty(len(order), dtype="S16")
    count = 0
    with tqdm(total=len(order), desc=plan.what, unit="image", disable=None) as progress:
        for index, item in enumerate(plan.items):
            if index >= len(order):
                break
            if item.shape != plan.shape or item.dtype != np.uint8:
                raise DatasetFileError(
                    f"{plan.what}: item {index} decodes to {item.dtype} {item.shape}, the others "
                    f"to uint8 {plan.shape}; all images of a split must have one size"
                )
            row = destination[index]
            out[row] = item
            digests[row] = hashlib.blake2b(item.tobytes(), digest_size=16).digest()
            count += 1
            progress.update(1)
    if count != len(order):
        raise DatasetFileError(
            f"{plan.what}: the source lists {len(order)} images but holds {count}"
        )
    targets = labels[order]
    bounds = np.flatnonzero(np.diff(targets)) + 1
    for start, stop in zip(np.r_[0, bounds], np.r_[bounds, len(targets)], strict=True):
        permutation = np.argsort(digests[start:stop], kind="stable")
        if (permutation != np.arange(len(permutation))).any():
            out[start:stop] = out[start:stop][permutation]
    return targets, classes


def load_decoded(
    *,
    key: str,
    root: Path,
    sources: list[Path],
    plan: Callable[[], Plan],
    cache_dir: Path | None,
) -> Decoded:
    """The decoded split from its cache, or decoded now (into the cache, or into memory when
    ``cache_dir`` is None). ``key`` names the cache files: dataset, mode, format and options."""
    if cache_dir is not None:
        cached, why = _open_cache(cache_dir, key, root, sources)
        if cached is not None:
            return cached
        if why != "no cache yet":
            _log.warning("rebuilding the decoded cache %s: %s", cache_dir / key, why)
    built = plan()
    shape = (len(built.names), *built.shape)
    if cache_dir is None:
        images = np.empty(shape, dtype=np.uint8)
        targets, classes = _fill(built, images)
        images.setflags(write=False)
        targets.setflags(write=False)
        return Decoded(images, targets, classes, None)
    cache_dir.mkdir(parents=True, exist_ok=True)
    images_path, targets_path, manifest_path = _paths(cache_dir, key)
    manifest_path.unlink(missing_ok=True)  # the manifest goes last: no half-written cache is read
    handle, temporary = tempfile.mkstemp(dir=cache_dir, prefix=f".{key}.", suffix=".npy.part")
    os.close(handle)
    partial = Path(temporary)
    try:
        with naming(images_path):
            memmap = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
            _reserve(partial)
            targets, classes = _fill(built, memmap)
            memmap.flush()
            del memmap
            os.replace(partial, images_path)
    finally:
        partial.unlink(missing_ok=True)
    with naming(targets_path):
        np.save(targets_path, targets, allow_pickle=False)
    manifest = {
        "version": _VERSION,
        "key": key,
        "shape": list(shape),
        "classes": classes,
        "sources": _stat_listing(root, sources),
        "content_sha256": _content_digest(sources),
        "images_size": images_path.stat().st_size,
        "images_sampled_sha256": _sampled_digest(images_path),
        "targets_sha256": _array_digest(targets),
    }
    with naming(manifest_path):
        _write_text(manifest_path, json.dumps(manifest))
    _log.info("decoded %d images into %s", shape[0], images_path)
    images = np.load(images_path, mmap_mode="r", allow_pickle=False)
    targets.setflags(write=False)
    return Decoded(images, targets, classes, images_path)
