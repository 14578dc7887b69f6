"""Omniglot (Lake et al., 2015) as a map-style dataset, decoded once into a cached uint8 tensor."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fewshot.data.download import DatasetNotFoundError, IntegrityError, download_url

__all__ = ["Omniglot"]

PARTS = ("images_background", "images_evaluation")
SPLITS = ("train", "val", "test")
_CACHE_VERSION = 1
# Below this many images a process pool costs more than it saves.
_POOL_MIN_IMAGES = 4000
_BATCH_CHARACTERS = 40


@dataclass(frozen=True)
class _Source:
    part: str
    path: Path
    is_zip: bool


def _list_source(source: _Source) -> dict[str, list[str]]:
    """Map "Alphabet/characterNN" to its sorted PNG member names (zip) or relative paths."""
    found: dict[str, list[str]] = {}
    if source.is_zip:
        try:
            with zipfile.ZipFile(source.path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise IntegrityError(f"{source.path} is not a readable zip archive: {exc}") from exc
    else:
        names = [p.relative_to(source.path.parent).as_posix()
                 for p in source.path.glob("*/*/*.png")]
    for name in names:
        parts = name.split("/")
        # Skips directory entries and OS junk such as __MACOSX/ or ._ resource forks.
        if (len(parts) == 4 and parts[0] == source.part and not parts[3].startswith(".")
                and parts[3].lower().endswith(".png")):
            found.setdefault(f"{parts[1]}/{parts[2]}", []).append(name)
    return {char: sorted(found[char]) for char in sorted(found)}


def _decode_png(data: bytes, size: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        gray = img.convert("L")
    if gray.size != (size, size):
        gray = gray.resize((size, size), Image.LANCZOS)
    # MAML's convention: strokes are bright on a dark background.
    return 255 - np.asarray(gray, dtype=np.uint8)


_open_zips: dict[str, zipfile.ZipFile] = {}


def _read_member(path: str, is_zip: bool, member: str) -> bytes:
    if not is_zip:
        return (Path(path).parent / member).read_bytes()
    # Re-opening a 20k-entry zip costs ~70 ms, so each process keeps its handles open.
    zf = _open_zips.get(path)
    if zf is None:
        zf = _open_zips[path] = zipfile.ZipFile(path)
    return zf.read(member)


def _decode_batch(task: tuple[str, bool, list[list[str]], int]) -> np.ndarray:
    path, is_zip, characters, size = task
    return np.stack([
        np.stack([_decode_png(_read_member(path, is_zip, m), size)[None] for m in members])
        for members in characters
    ])


def _decode_characters(groups: list[tuple[_Source, list[list[str]]]], size: int) -> np.ndarray:
    """Decode every character's images into uint8 [n_chars, n_images, 1, size, size]."""
    tasks = [(str(src.path), src.is_zip, chars[i:i + _BATCH_CHARACTERS], size)
             for src, chars in groups for i in range(0, len(chars), _BATCH_CHARACTERS)]
    n_images = sum(len(members) for _, chars in groups for members in chars)
    workers = min(os.cpu_count() or 1, 8)
    # Daemonic processes (e.g. DataLoader workers) may not have children.
    use_pool = (workers > 1 and n_images >= _POOL_MIN_IMAGES and not
                multiprocessing.current_process().daemon and
                "fork" in multiprocessing.get_all_start_methods())
    results: list[np.ndarray] = []
    try:
        if use_pool:
            # fork: spawn would re-import torch in every worker, eating most of the gain.
            ctx = multiprocessing.get_context("fork")
            # Forked children must not share the parent's zip file offsets, hence the clear.
            with ctx.Pool(workers, initializer=_open_zips.clear) as pool:
                results = list(_with_progress(pool.imap(_decode_batch, tasks), tasks))
        else:
            results = list(_with_progress(map(_decode_batch, tasks), tasks))
    finally:
        for zf in _open_zips.values():
            zf.close()
        _open_zips.clear()
    return np.concatenate(results)


def _with_progress(results: Iterator[np.ndarray], tasks: list) -> Iterator[np.ndarray]:
    if not sys.stdout.isatty():
        yield from results
        return
    from rich.progress import Progress

    total = sum(len(t[2]) for t in tasks)
    with Progress() as progress:
        bar = progress.add_task("Decoding Omniglot characters", total=total)
        for batch in results:
            progress.advance(bar, len(batch))
            yield batch


class Omniglot(torch.utils.data.Dataset):
    """Omniglot characters as classes, torchvision-style, with a fast per-class access path.

    ``root`` holds ``images_background.zip`` and ``images_evaluation.zip`` or their extracted
    folders. All 1623 characters are decoded once (grayscale, LANCZOS-resized, inverted so
    strokes are 1.0) and cached as uint8 under ``cache_dir`` (default ``$FEWSHOT_CACHE_DIR`` or
    ``~/.cache/fewshot``), so ``root`` may be read-only.
    """

    urls = {p: f"https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{p}.zip"
            for p in PARTS}
    md5s = {"images_background": "68d2efa1b9178cc56df9314c21c6e718",
            "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
    # Local copies are verified by structure, not md5, since re-zipped copies are common.
    expected_characters = {"images_background": 964, "images_evaluation": 659}
    images_per_character = 20
    maml_split_sizes = (1100, 100, 423)
    channels = 1

    def __init__(self, root: str | Path, split: str = "train", class_split: str | Path = "maml",
                 image_size: int = 28, rotations: bool | None = None, download: bool = False,
                 cache_dir: str | Path | None = None, transform: Callable | None = None,
                 target_transform: Callable | None = None, split_seed: int = 0) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if class_split == "lake" and split == "val":
            raise ValueError("class_split='lake' has no validation set (Lake's split is "
                             "background=train, evaluation=test); use 'maml' or a split folder")
        # Checked before the (slow, first-time) decode rather than after it.
        if class_split not in ("maml", "lake") and not Path(class_split).is_dir():
            raise ValueError(f"class_split must be 'maml', 'lake' or a directory holding "
                             f"train.txt/val.txt/test.txt; got {class_split!r}")
        self.root = Path(root).expanduser()
        self.split, self.image_size = split, image_size
        self.rotations = split == "train" if rotations is None else bool(rotations)
        self.transform, self.target_transform = transform, target_transform
        self.class_split = class_split

        sources = self._find_sources(download)
        listings = {part: self._checked_listing(src) for part, src in sources.items()}
        names = [c for part in PARTS for c in listings[part]]
        if len(set(names)) != len(names):
            raise IntegrityError(f"{self.root}: background and evaluation share character names")
        groups = [(sources[part], list(listings[part].values())) for part in PARTS]
        cache_dir = cache_dir or os.environ.get("FEWSHOT_CACHE_DIR") or "~/.cache/fewshot"
        images = self._cached_images(groups, names, Path(cache_dir).expanduser() / "omniglot")

        n_background = len(listings["images_background"])
        chosen = self._select(names, n_background, class_split, split_seed)
        self.characters = [names[i] for i in chosen]
        self._images = torch.from_numpy(images[np.asarray(chosen, dtype=np.int64)])
        n_rot = 4 if self.rotations else 1
        suffixes = ["", "/rot90", "/rot180", "/rot270"][:n_rot]
        self.classes = [c + s for c in self.characters for s in suffixes]
        self.class_sizes = [self._images.shape[1]] * len(self.classes)

    def _locate(self, part: str) -> _Source | None:
        archive, folder = self.root / f"{part}.zip", self.root / part
        return (_Source(part, archive, True) if archive.is_file()
                else _Source(part, folder, False) if folder.is_dir() else None)

    def _find_sources(self, download: bool) -> dict[str, _Source]:
        found = {part: self._locate(part) for part in PARTS}
        if download:
            for part in (p for p, s in found.items() if s is None):
                download_url(self.urls[part], self.root / f"{part}.zip", self.md5s[part])
                found[part] = self._locate(part)
        missing = [p for p, s in found.items() if s is None]
        if missing:
            looked = ", ".join(f"{self.root / p}.zip or {self.root / p}/" for p in missing)
            raise DatasetNotFoundError(
                f"Omniglot not found in {self.root} (looked for {looked}). Use download=True, "
                "or point root at a folder holding images_background.zip and "
                "images_evaluation.zip (or their extracted folders)."
            )
        return {p: s for p, s in found.items() if s is not None}

    def _checked_listing(self, source: _Source) -> dict[str, list[str]]:
        listing = _list_source(source)
        want, per = self.expected_characters[source.part], self.images_per_character
        bad = [f"{c} ({len(m)})" for c, m in listing.items() if len(m) != per]
        if len(listing) != want or bad:
            detail = f"; wrong image counts: {', '.join(bad[:5])}" if bad else ""
            raise IntegrityError(
                f"{source.path} does not look like Omniglot's {source.part}: expected {want} "
                f"character folders with {per} images each, found {len(listing)} character "
                f"folders{detail}. Delete it and use download=True, or replace it."
            )
        return listing

    def _cache_path(self, groups: list[tuple[_Source, list[list[str]]]], cache_dir: Path) -> Path:
        # Cheap to compute yet changes whenever the source does: zip name, size and mtime, or
        # for extracted folders the full file list.
        digest = hashlib.sha256(f"v{_CACHE_VERSION}".encode())
        for src, chars in groups:
            if src.is_zip:
                st = src.path.stat()
                digest.update(f"zip:{src.part}:{src.path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
            else:
                digest.update("\n".join(["dir", *(m for members in chars for m in members)]).encode())
        return cache_dir / f"omniglot-{self.image_size}px-{digest.hexdigest()[:16]}.npz"

    def _cached_images(self, groups: list[tuple[_Source, list[list[str]]]], names: list[str],
                       cache_dir: Path) -> np.ndarray:
        path = self._cache_path(groups, cache_dir)
        shape = (len(names), self.images_per_character, 1, self.image_size, self.image_size)
        images = _load_cache(path, names, shape)
        if images is None:
            images = _decode_characters(groups, self.image_size)
            _save_cache(path, images, names)
        return images

    def _select(self, names: list[str], n_background: int, class_split: str | Path,
                seed: int) -> list[int]:
        if class_split == "lake":
            return list(range(n_background)) if self.split == "train" \
                else list(range(n_background, len(names)))
        if class_split == "maml":
            sizes = self.maml_split_sizes
            if sum(sizes) != len(names):
                raise ValueError(f"maml_split_sizes {sizes} do not add up to {len(names)} characters")
            # RandomState's stream is frozen by numpy, so the split is stable across versions.
            order = np.random.RandomState(seed).permutation(len(names))
            start = sum(sizes[:SPLITS.index(self.split)])
            return sorted(int(i) for i in order[start:start + sizes[SPLITS.index(self.split)]])
        split_file = Path(class_split) / f"{self.split}.txt"
        return _read_split_file(split_file, {n: i for i, n in enumerate(names)})

    def __len__(self) -> int:
        return sum(self.class_sizes)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        class_id, image = divmod(index % len(self), self._images.shape[1])
        target = self.target_transform(class_id) if self.target_transform else class_id
        return self.load_class_images(class_id, [image])[0], target

    def load_class_images(self, class_id: int, image_indices: Sequence[int] | Tensor) -> Tensor:
        """float32 [k, 1, H, W] in [0, 1] for the given images of one class, rotated as needed."""
        class_id = int(class_id)
        if not 0 <= class_id < len(self.classes):
            raise IndexError(f"class_id {class_id} out of range for {len(self.classes)} classes")
        base, turns = divmod(class_id, 4) if self.rotations else (class_id, 0)
        idx = torch.as_tensor(image_indices, dtype=torch.long)
        images = self._images[base].index_select(0, idx).float().div_(255.0)
        if turns:
            images = torch.rot90(images, turns, dims=(-2, -1))
        if self.transform is not None:
            images = torch.stack([self.transform(img) for img in images])
        return images

    def __repr__(self) -> str:
        return (f"Omniglot(split={self.split!r}, class_split={str(self.class_split)!r}, "
                f"classes={len(self.classes)}, images={len(self)}, "
                f"image_size={self.image_size}, rotations={self.rotations})")


def _read_split_file(path: Path, index: dict[str, int]) -> list[int]:
    if not path.is_file():
        raise FileNotFoundError(f"Split file {path} does not exist")
    chosen: list[int] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        name = line.strip().replace("\\", "/").strip("/")
        if not name or name.startswith("#"):
            continue
        if name not in index:
            raise ValueError(f"{path}:{lineno}: unknown Omniglot character {name!r}")
        chosen.append(index[name])
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"{path}: some characters are listed more than once")
    return chosen


def _load_cache(path: Path, names: list[str], shape: tuple[int, ...]) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            images, cached_names = data["images"], data["names"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        warnings.warn(f"Ignoring unreadable Omniglot cache {path} ({exc}); decoding again",
                      stacklevel=3)
        return None
    # A fingerprint collision or an incomplete file must never be served as data.
    if images.dtype != np.uint8 or images.shape != shape or cached_names.tolist() != names:
        return None
    return images


def _save_cache(path: Path, images: np.ndarray, names: list[str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        warnings.warn(f"Cannot write the Omniglot cache in {path.parent} ({exc}); "
                      "the images will be decoded again next time", stacklevel=3)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, names=np.array(names, dtype=np.str_))
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"Failed to write the Omniglot cache {path} ({exc})", stacklevel=3)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
