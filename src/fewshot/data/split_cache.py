"""The decoded-once cache of a dataset split: one uint8 ``.npy`` plus a JSON description.

A split's images are stored class after class in a single ``[N, C, S, S]`` uint8 array, which
is memory-mapped when read: epochs never decode again, the first access costs no copy, and
DataLoader workers share the operating system's page cache instead of each holding a copy.

The file names carry the dataset, split, image size, channels and a fingerprint of the source
files, so a changed source or setting never meets a stale cache. Both files are written under
temporary names and renamed into place, the JSON last: a cache is complete exactly when its
JSON exists and agrees with the array's header and size, and anything else is rebuilt.

The JSON also records a CRC-32 of the pixels, checked each time the cache is opened (about
3 GB/s, a quarter of a second for mini-ImageNet's training split): a byte flipped on disk
is named in a warning and the cache rebuilt, never trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["StoredSplit", "cache_root", "fingerprint", "load_split", "pixels_crc32", "save_split"]

_CACHE_VERSION = 2  # 2: the JSON records the pixels' CRC-32
_CRC_CHUNK = 64 * 2**20


@dataclass
class StoredSplit:
    """A split's images, class after class.

    Attributes:
        images: uint8 ``[N, C, S, S]``, in memory or memory-mapped from ``path``.
        classes: class names, in storage order.
        class_sizes: images per class; they add up to ``N``.
        skipped: ``(file, reason)`` of source files left out as unreadable.
        path: the ``.npy`` file ``images`` is mapped from, or None if held in memory.
    """

    images: np.ndarray
    classes: list[str]
    class_sizes: list[int]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    path: Path | None = None

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.class_sizes) or sum(self.class_sizes) != len(self.images):
            raise ValueError(f"{len(self.classes)} classes with {sum(self.class_sizes)} images "
                             f"do not describe an array of {len(self.images)} images")


def cache_root(cache_dir: str | Path | None) -> Path:
    """``cache_dir``, else ``$FEWSHOT_CACHE_DIR``, else ``~/.cache/fewshot``."""
    chosen = cache_dir or os.environ.get("FEWSHOT_CACHE_DIR") or "~/.cache/fewshot"
    return Path(chosen).expanduser()


def fingerprint(entries: Iterable[str]) -> str:
    """A short hex digest of ``entries`` (e.g. ``"relative/path:size:mtime_ns"`` per file)."""
    digest = hashlib.sha256(f"v{_CACHE_VERSION}".encode())
    for entry in entries:
        digest.update(entry.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()[:16]


def pixels_crc32(images: np.ndarray) -> int:
    """CRC-32 of the array's bytes in storage order, read in chunks (a memory map stays lazy)."""
    flat = images.reshape(-1)
    crc = 0
    for start in range(0, flat.size, _CRC_CHUNK):
        crc = zlib.crc32(np.ascontiguousarray(flat[start:start + _CRC_CHUNK]), crc)
    return crc


def _paths(directory: Path, stem: str) -> tuple[Path, Path]:
    return directory / f"{stem}.npy", directory / f"{stem}.json"


def load_split(directory: Path, stem: str) -> StoredSplit | None:
    """The complete cache ``stem`` in ``directory``, memory-mapped; None if absent or partial."""
    array_path, meta_path = _paths(directory, stem)
    if not meta_path.is_file() or not array_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        # mmap refuses a file shorter than its header promises, i.e. a truncated array.
        images = np.load(array_path, mmap_mode="r", allow_pickle=False)
        stored = StoredSplit(images, list(meta["classes"]), [int(n) for n in meta["class_sizes"]],
                             [tuple(s) for s in meta["skipped"]], array_path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        warnings.warn(f"Ignoring unreadable cache {array_path} ({exc}); decoding again",
                      stacklevel=3)
        return None
    if (meta.get("version") != _CACHE_VERSION or images.dtype != np.uint8
            or list(images.shape) != meta.get("shape")
            or array_path.stat().st_size != meta.get("bytes")):
        return None
    if pixels_crc32(images) != meta.get("crc32"):
        warnings.warn(f"Ignoring corrupt cache {array_path}: its pixels do not match the CRC-32 "
                      f"recorded in {meta_path.name}; decoding again", stacklevel=3)
        return None
    return stored


def _write_atomically(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_split(directory: Path, stem: str, split: StoredSplit) -> StoredSplit:
    """Write ``split`` as cache ``stem`` and return it memory-mapped from there.

    If the cache cannot be written (read-only or full disk) the split is returned as it is,
    in memory, with a warning that it will be decoded again next time.
    """
    array_path, meta_path = _paths(directory, stem)
    target = array_path
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomically(array_path, lambda f: np.save(f, np.ascontiguousarray(split.images)))
        target = meta_path
        meta = {"version": _CACHE_VERSION, "shape": list(split.images.shape),
                "bytes": array_path.stat().st_size, "crc32": pixels_crc32(split.images),
                "classes": split.classes,
                "class_sizes": split.class_sizes, "skipped": [list(s) for s in split.skipped]}
        _write_atomically(meta_path, lambda f: f.write(json.dumps(meta).encode()))
    except OSError as exc:
        if target == meta_path:  # an array without its description is no cache: no debris
            array_path.unlink(missing_ok=True)
        warnings.warn(f"Cannot write the image cache: writing {target} failed ({exc}); the "
                      "images will be decoded again next time", stacklevel=3)
        return split
    return load_split(directory, stem) or split
