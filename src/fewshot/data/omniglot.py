"""Omniglot (Lake et al., 2015): 1623 handwritten characters of 20 drawings each.

The images are read from the two official archives ``images_background.zip`` (964 characters)
and ``images_evaluation.zip`` (659), or from their extracted folders, decoded once by the
shared decoder (:mod:`~fewshot.data.image_decoding`: grayscale, LANCZOS-resized) and inverted
so strokes are bright on a dark background, MAML's convention. All characters go into one
cache (:mod:`~fewshot.data.split_cache`), from which every split and class split is served.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fewshot.data.class_images import SPLITS, CachedClassImages, check_split_name, file_entries
from fewshot.data.download import DatasetNotFoundError, IntegrityError, download_url
from fewshot.data.image_decoding import ImageSource, ZipMember
from fewshot.data.image_folder import decode_class_folders
from fewshot.data.split_cache import StoredSplit, cache_root

__all__ = ["Omniglot"]

PARTS = ("images_background", "images_evaluation")
_TURN_SUFFIXES = ("", "/rot90", "/rot180", "/rot270")


@dataclass(frozen=True)
class _Source:
    part: str
    path: Path
    is_zip: bool

    def image(self, member: str) -> ImageSource:
        """The image ``member`` (a name relative to ``path``'s folder, zip-style)."""
        return ZipMember(str(self.path), member) if self.is_zip else self.path.parent / member


def _list_source(source: _Source) -> dict[str, list[str]]:
    """Map "Alphabet/characterNN" to its sorted PNG member names (zip) or relative paths."""
    if source.is_zip:
        try:
            with zipfile.ZipFile(source.path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as exc:
            raise IntegrityError(f"{source.path} is not a readable zip archive: {exc}") from exc
    else:
        names = [p.relative_to(source.path.parent).as_posix()
                 for p in source.path.glob("*/*/*.png")]
    found: dict[str, list[str]] = {}
    for name in names:
        parts = name.split("/")
        # Skips directory entries and OS junk such as __MACOSX/ or ._ resource forks.
        if (len(parts) == 4 and parts[0] == source.part and not parts[3].startswith(".")
                and parts[3].lower().endswith(".png")):
            found.setdefault(f"{parts[1]}/{parts[2]}", []).append(name)
    return {char: sorted(found[char]) for char in sorted(found)}


class Omniglot(CachedClassImages):
    """Omniglot characters as classes, torchvision-style (see the module docstring).

    Args:
        root: folder holding ``images_background.zip`` and ``images_evaluation.zip`` or their
            extracted folders; it may be read-only.
        split: ``train``, ``val`` or ``test``.
        class_split: ``maml`` (None too: the seeded 1100 / 100 / 423 character split of MAML's
            code), ``lake`` (background = train, evaluation = test; no validation set) or a
            folder holding ``train.txt``/``val.txt``/``test.txt``, one ``Alphabet/characterNN``
            per line.
        image_size: images are resized to ``image_size x image_size`` (28 in the literature).
        rotations: serve each character 4 times, rotated by 0/90/180/270 degrees, as 4 classes
            (default: for the train split only).
        download: fetch the official archives (md5-checked) if missing.
        cache_dir: writable folder for the decoded cache (default ``$FEWSHOT_CACHE_DIR`` or
            ``~/.cache/fewshot``).
        transform, target_transform: as in torchvision, applied per image / class id.
        split_seed: seed of the ``maml`` split.
        channels: 1; Omniglot is grayscale (accepted for a uniform interface).
        skip_bad_images: leave unreadable PNGs out with one warning instead of failing.

    Example:
        >>> train = Omniglot("data/omniglot", split="train", download=True)  # doctest: +SKIP
        >>> len(train.classes), train.load_class_images(0, [0, 1]).shape  # doctest: +SKIP
        (4400, torch.Size([2, 1, 28, 28]))
    """

    urls = {p: f"https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{p}.zip"
            for p in PARTS}
    md5s = {"images_background": "68d2efa1b9178cc56df9314c21c6e718",
            "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811"}
    # Local copies are verified by structure, not md5, since re-zipped copies are common.
    expected_characters = {"images_background": 964, "images_evaluation": 659}
    images_per_character = 20
    maml_split_sizes = (1100, 100, 423)
    supported_channels = (1,)
    # The class splits this dataset knows by name (a folder of split files works too).
    named_class_splits = ("maml", "lake")
    # Strokes are stored bright on dark: a drawing (dark on white paper) must be inverted too.
    preprocessing = {"invert": True, "mean": (0.0,), "std": (1.0,)}

    def __init__(self, root: str | Path, split: str = "train",
                 class_split: str | Path | None = "maml", image_size: int = 28,
                 rotations: bool | None = None, download: bool = False,
                 cache_dir: str | Path | None = None, transform: Callable | None = None,
                 target_transform: Callable | None = None, split_seed: int = 0,
                 channels: int = 1, skip_bad_images: bool = False) -> None:
        check_split_name(split)
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.check_channels(channels)
        class_split = "maml" if class_split is None else class_split
        if class_split == "lake" and split == "val":
            raise ValueError("class_split='lake' has no validation set (Lake's split is "
                             "background=train, evaluation=test); use 'maml' or a split folder")
        # Checked before the (slow, first-time) decode rather than after it.
        if class_split not in ("maml", "lake") and not Path(class_split).is_dir():
            raise ValueError(f"class_split must be 'maml', 'lake' or a directory holding "
                             f"train.txt/val.txt/test.txt; got {class_split!r}")
        self.root = Path(root).expanduser()
        self.split, self.image_size, self.channels = split, image_size, channels
        self.rotations = split == "train" if rotations is None else bool(rotations)
        self.transform, self.target_transform = transform, target_transform
        self.class_split = class_split

        sources = self._find_sources(download)
        listings = {part: self._checked_listing(src) for part, src in sources.items()}
        names = [c for part in PARTS for c in listings[part]]
        if len(set(names)) != len(names):
            raise IntegrityError(f"{self.root}: background and evaluation share character names")
        self._use_cache(cache_root(cache_dir) / "omniglot", "omniglot", "all",
                        self._fingerprint_entries(sources, listings),
                        lambda: self._decode(sources, listings), skip_bad_images,
                        f"Omniglot in {self.root}", classes=names)

        n_background = len(listings["images_background"])
        chosen = self._select(names, n_background, class_split, split_seed)
        self.characters = [names[i] for i in chosen]
        first_rows = self._first_rows[chosen]
        sizes = [self.class_sizes[i] for i in chosen]
        turns = range(4 if self.rotations else 1)
        self._serve([c + _TURN_SUFFIXES[t] for c in self.characters for t in turns],
                    [n for n in sizes for _ in turns], np.repeat(first_rows, len(turns)),
                    np.tile(np.asarray(turns), len(chosen)) if self.rotations else None)

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

    @staticmethod
    def _fingerprint_entries(sources: dict[str, _Source],
                             listings: dict[str, dict[str, list[str]]]) -> list[str]:
        # Changes whenever the source does: the archives' names, sizes and modification times,
        # or for extracted folders every file's.
        entries = []
        for part in PARTS:
            src = sources[part]
            if src.is_zip:
                st = src.path.stat()
                entries.append(f"zip:{part}:{src.path.name}:{st.st_size}:{st.st_mtime_ns}")
            else:
                files = [src.path.parent / m for members in listings[part].values()
                         for m in members]
                entries += [f"dir:{part}", *file_entries(files, src.path.parent)]
        return entries

    def _decode(self, sources: dict[str, _Source],
                listings: dict[str, dict[str, list[str]]]) -> StoredSplit:
        characters = {name: [sources[part].image(m) for m in members]
                      for part in PARTS for name, members in listings[part].items()}
        stored = decode_class_folders(characters, self.image_size, 1, "Decoding Omniglot")
        # MAML's convention: strokes are bright on a dark background.
        np.subtract(255, stored.images, out=stored.images)
        return stored

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
