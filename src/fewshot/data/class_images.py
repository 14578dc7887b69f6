"""The dataset behind every cached split: classes of uint8 images in one (memory-mapped) array.

:class:`CachedClassImages` is what the episode sampler needs (:class:`fewshot.data.episodes.
ClassImages`: ``classes``, ``class_sizes``, ``load_class_images``) plus the torchvision-style
map interface. The concrete datasets (:mod:`~fewshot.data.omniglot`,
:mod:`~fewshot.data.mini_imagenet`, :mod:`~fewshot.data.cifar_fs`,
:mod:`~fewshot.data.image_folder`) only find, check and decode their sources into a
:class:`~fewshot.data.split_cache.StoredSplit`, and declare what the rest of fewshot needs to
know about them as class attributes (see :class:`CachedClassImages`); they are registered by
name in :mod:`fewshot.data.registry`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fewshot.data.download import IntegrityError
from fewshot.data.image_decoding import report_bad_images
from fewshot.data.split_cache import StoredSplit, fingerprint, load_split, save_split

__all__ = ["SPLITS", "CachedClassImages", "check_disjoint_splits", "check_image_options",
           "check_split_name", "file_entries"]

SPLITS = ("train", "val", "test")


def check_split_name(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def check_image_options(image_size: int, channels: int) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


def check_disjoint_splits(split_classes: dict[str, dict[str, int]], where: str) -> None:
    """Fail if a class name is in two splits. ``split_classes``: split -> {class: images}."""
    seen: dict[str, str] = {}
    clashes = []
    for split, classes in split_classes.items():
        for name in classes:
            if name in seen:
                first = seen[name]
                clashes.append(f"{name!r} in {first!r} ({split_classes[first][name]} images) "
                               f"and {split!r} ({classes[name]} images)")
            else:
                seen[name] = split
    if clashes:
        shown = "; ".join(clashes[:10]) + (f"; and {len(clashes) - 10} more" if len(clashes) > 10
                                           else "")
        raise IntegrityError(
            f"{where}: {len(clashes)} class name(s) appear in more than one split, so test "
            f"classes would leak into training: {shown}"
        )


def file_entries(files: Sequence[Path], relative_to: Path) -> list[str]:
    """Fingerprint entries of ``files``: relative path, size and modification time."""
    entries = []
    for path in files:
        st = path.stat()
        entries.append(f"{path.relative_to(relative_to).as_posix()}:{st.st_size}:{st.st_mtime_ns}")
    return entries


class CachedClassImages(torch.utils.data.Dataset):
    """One split of a few-shot dataset: ``classes`` of uint8 images decoded once and cached.

    Subclasses call :meth:`_use_cache` from their ``__init__``. Indexing is class-major: item
    ``i`` is image ``i - start(c)`` of the class ``c`` it falls in, as ``(image, class_id)``.

    What a registered dataset (:mod:`fewshot.data.registry`) provides:

    - a constructor ``(root, split=..., *, class_split, image_size, channels, download,
      cache_dir, skip_bad_images, split_seed, transform, target_transform)``, where
      ``class_split=None`` is the dataset's standard class split and options that do not apply
      to it (e.g. ``split_seed`` for a fixed split) are accepted and ignored;
    - ``preprocessing``: ``{"invert", "mean", "std"}``, what a new image needs besides
      decoding to look like this dataset's images (:class:`fewshot.inference.images.
      Preprocessing`), declared by each dataset class itself;
    - ``supported_channels``: the ``channels`` it can serve (:meth:`check_channels`).
    - ``named_class_splits``: the ``class_split`` names it knows (besides None, its standard
      split, and a folder of split files where it takes one).
    """

    channels: int
    image_size: int
    transform: Callable | None = None
    target_transform: Callable | None = None
    supported_channels: tuple[int, ...] = (1, 3)
    named_class_splits: tuple[str, ...] = ()

    @classmethod
    def check_channels(cls, channels: int) -> None:
        """Raise ValueError unless this dataset can serve ``channels``-channel images."""
        if channels in cls.supported_channels:
            return
        if set(cls.supported_channels) == {1, 3}:
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
        counts = " or ".join(map(str, cls.supported_channels))
        plural = "" if cls.supported_channels == (1,) else "s"
        raise ValueError(f"{cls.__name__} images have {counts} channel{plural}, "
                         f"got channels={channels!r}")

    def _use_cache(self, cache_dir: Path, dataset: str, split: str, source: list[str],
                   build: Callable[[], StoredSplit], skip_bad_images: bool, what: str,
                   classes: list[str] | None = None) -> None:
        """Load the cache keyed by the settings and ``source`` fingerprint, or ``build`` it.

        Unreadable source files are recorded in the cache, so a strict run fails on them
        (and a lenient one warns about them) every time, not only when decoding. If the
        ``classes`` are known beforehand, a cache holding other classes (a fingerprint
        collision) is rebuilt too.
        """
        stem = (f"{dataset}-{split}-{self.image_size}px-{self.channels}ch-"
                f"{fingerprint(source)}")
        stored = load_split(cache_dir, stem)
        if stored is None or (classes is not None and stored.classes != classes):
            stored = save_split(cache_dir, stem, build())
        report_bad_images(stored.skipped, skip_bad_images, what)
        empty = [name for name, size in zip(stored.classes, stored.class_sizes, strict=True)
                 if size == 0]
        if not stored.classes or empty:
            detail = f"classes without images: {', '.join(empty[:10])}" if empty else "no classes"
            raise IntegrityError(f"{what} has {detail}")
        self._set_stored(stored)

    def _set_stored(self, stored: StoredSplit) -> None:
        self._images = stored.images
        self._cache_file = stored.path
        starts = np.cumsum([0, *stored.class_sizes], dtype=np.int64)[:-1]
        self._serve(list(stored.classes), list(stored.class_sizes), starts)

    def _serve(self, classes: list[str], class_sizes: list[int], first_rows: Sequence[int],
               quarter_turns: Sequence[int] | None = None) -> None:
        """Serve ``classes``: class ``c`` is the ``class_sizes[c]`` stored images from row
        ``first_rows[c]`` on, rotated by ``quarter_turns[c]`` x 90 degrees (default 0).

        By default each stored class is served once; a subclass may serve a selection of them,
        or one stored class several times (Omniglot's rotated characters).
        """
        if not len(classes) == len(class_sizes) == len(first_rows):
            raise ValueError("classes, class_sizes and first_rows must have the same length")
        self.classes = list(classes)
        self.class_sizes = [int(n) for n in class_sizes]
        self._first_rows = np.asarray(first_rows, dtype=np.int64)
        self._quarter_turns = (None if quarter_turns is None
                               else np.asarray(quarter_turns, dtype=np.int64) % 4)
        self._starts = np.cumsum([0, *self.class_sizes], dtype=np.int64)

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers started by spawn/forkserver receive the dataset pickled: send the
        # cache's path, not a copy of the images.
        state = self.__dict__.copy()
        if self._cache_file is not None:
            state["_images"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._images is None:
            self._images = np.load(self._cache_file, mmap_mode="r", allow_pickle=False)

    def load_class_images(self, class_id: int, image_indices: Sequence[int] | Tensor) -> Tensor:
        """float32 ``[k, C, S, S]`` in ``[0, 1]``: the given images of class ``class_id``."""
        class_id = int(class_id)
        if not 0 <= class_id < len(self.classes):
            raise IndexError(f"class_id {class_id} out of range for {len(self.classes)} classes")
        indices = np.asarray(image_indices, dtype=np.int64).reshape(-1)
        size = self.class_sizes[class_id]
        if indices.size and (indices.min() < 0 or indices.max() >= size):
            raise IndexError(f"image indices {indices.tolist()} out of range for class "
                             f"{self.classes[class_id]!r} with {size} images")
        # Fancy indexing copies just these images out of the memory map.
        pixels = self._images[self._first_rows[class_id] + indices]
        images = torch.from_numpy(pixels).float().div_(255.0)
        turns = 0 if self._quarter_turns is None else int(self._quarter_turns[class_id])
        if turns:
            images = torch.rot90(images, turns, dims=(-2, -1))
        if self.transform is not None:
            images = torch.stack([self.transform(image) for image in images])
        return images

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        class_id = int(np.searchsorted(self._starts, index, side="right")) - 1
        image = self.load_class_images(class_id, [index - int(self._starts[class_id])])[0]
        target = self.target_transform(class_id) if self.target_transform else class_id
        return image, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(split={getattr(self, 'split', '?')!r}, "
                f"classes={len(self.classes)}, images={len(self)}, "
                f"image_size={self.image_size}, channels={self.channels})")
