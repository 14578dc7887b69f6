"""tiered-ImageNet (Ren et al., ICLR 2018): 608 ImageNet classes in 34 high-level categories,
split by category into 351 / 97 / 160 classes (20 / 6 / 8 categories), 84x84 RGB.

Read from the authors' distribution (``tiered-imagenet.tar``, or the same files on the mirror
learn2learn uses, :mod:`fewshot.data.mirror`), one pair of pickles per split, in ``root`` or
``root/tiered-imagenet/``, with or without the mirror's ``tiered-imagenet-`` prefix:

- ``{split}_images_png.pkl``: a list of the split's images, each a uint8 array holding a PNG;
- ``{split}_labels.pkl``: a dict with ``label_specific`` (the class index of every image),
  ``label_specific_str`` (the class synsets), ``label_general`` (the category index of every
  image) and ``label_general_str`` (the category synsets).

Both are read with the restricted unpickler (:mod:`fewshot.data.safe_pickle`), checked, and
the PNGs decoded once into the uint8 cache. ``download=True`` fetches the six pickles (about
12 GB; loading a split's images pickle needs about its size in memory once, while decoding).
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fewshot.data.class_images import (
    SPLITS,
    CachedClassImages,
    check_disjoint_splits,
    check_image_options,
    check_split_name,
)
from fewshot.data.download import DatasetNotFoundError, IntegrityError, check_download
from fewshot.data.image_decoding import decode_encoded_images
from fewshot.data.mirror import download_from_mirror
from fewshot.data.safe_pickle import load_pickle
from fewshot.data.split_cache import StoredSplit, cache_root

__all__ = ["TieredImageNet"]

MIRROR_PREFIX = "tiered-imagenet-"
PARTS = ("images_png", "labels")
LABEL_KEYS = ("label_specific", "label_specific_str", "label_general", "label_general_str")


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def read_split_csv(path: Path) -> dict[str, str]:
    """``{class synset: category synset}`` from a split file with rows ``class,category``
    (the format of the authors' ``tiered_imagenet_split/{train,val,test}.csv``)."""
    if not path.is_file():
        raise FileNotFoundError(f"Split file {path} does not exist")
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row and not row[0].startswith("#")]
    if any(len(row) != 2 for row in rows):
        raise IntegrityError(f"{path}: every row must be 'class,category'")
    return {row[0].strip(): row[1].strip() for row in rows}


class TieredImageNet(CachedClassImages):
    """One split of tiered-ImageNet, decoded once into a cached uint8 array (module docstring).

    Args:
        root: folder with the pickles (or ``tiered-imagenet/`` holding them).
        split: ``train``, ``val`` or ``test``.
        class_split: None or ``"ren"``: the distribution's split, checked by its counts
            (351/97/160 classes in 20/6/8 categories); or a folder of ``{train,val,test}.csv``
            (rows ``class,category``) the split's classes must equal exactly.
        image_size: images are resized to ``image_size x image_size`` (84: unchanged).
        channels: 3 (RGB) or 1 (grayscale).
        download: fetch the pickles from the mirror when ``root`` does not have them.
        cache_dir: writable folder for the decoded cache (default ``$FEWSHOT_CACHE_DIR`` or
            ``~/.cache/fewshot``).
        skip_bad_images: leave undecodable images out with one warning instead of failing.
        transform, target_transform: as in torchvision, applied per image / class id.
        split_seed: accepted for a uniform interface; the class split is fixed.
    """

    preprocessing = {"invert": False, "mean": (0.0,), "std": (1.0,)}
    named_class_splits = ("ren",)
    expected_classes = {"train": 351, "val": 97, "test": 160}
    expected_categories = {"train": 20, "val": 6, "test": 8}

    def __init__(self, root: str | Path, split: str = "train", class_split: str | Path | None = None,
                 image_size: int = 84, channels: int = 3, download: bool = False,
                 cache_dir: str | Path | None = None, skip_bad_images: bool = False,
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 split_seed: int = 0) -> None:
        check_split_name(split)
        check_image_options(image_size, channels)
        self.root = Path(root).expanduser()
        self.split, self.image_size, self.channels = split, image_size, channels
        self.transform, self.target_transform = transform, target_transform
        required = self._required_split(class_split)
        images_path, labels_path = self._files(split, download)
        for path in (images_path, labels_path):
            check_download(path)
        what = f"the {split!r} split of tiered-ImageNet in {images_path.parent}"
        source = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                  for p in (images_path, labels_path)]
        self._use_cache(cache_root(cache_dir) / "tiered_imagenet", "tiered_imagenet", split,
                        source, lambda: self._decode(images_path, labels_path, what),
                        skip_bad_images, what)
        if required is not None:
            self._check_against(required, class_split)

    # -- finding the files ---------------------------------------------------------------

    def _files(self, split: str, download: bool) -> tuple[Path, Path]:
        found = self._find(split)
        if found is None and download:
            names = [f"{MIRROR_PREFIX}{s}_{part}.pkl" for s in SPLITS for part in PARTS]
            download_from_mirror(names, self.root)
            found = self._find(split)
        if found is None:
            raise DatasetNotFoundError(
                f"tiered-ImageNet not found in {self.root} (looked for {split}_images_png.pkl "
                f"and {split}_labels.pkl, with or without the '{MIRROR_PREFIX}' prefix, there "
                "and in tiered-imagenet/). --data.download true fetches them from the mirror "
                "learn2learn uses (Zenodo record 7978538, about 12 GB; the ImageNet terms of use "
                "apply), or extract the authors' tiered-imagenet.tar into root.")
        return found

    def _find(self, split: str) -> tuple[Path, Path] | None:
        for folder in (self.root, self.root / "tiered-imagenet"):
            for prefix in ("", MIRROR_PREFIX):
                paths = tuple(folder / f"{prefix}{split}_{part}.pkl" for part in PARTS)
                if all(p.is_file() for p in paths):
                    return paths  # type: ignore[return-value]
        return None

    # -- reading and checking ------------------------------------------------------------

    def _decode(self, images_path: Path, labels_path: Path, what: str) -> StoredSplit:
        labels = load_pickle(labels_path)
        if not isinstance(labels, dict) or not set(LABEL_KEYS) <= set(map(_text, labels)):
            keys = sorted(map(_text, labels)) if isinstance(labels, dict) else type(labels).__name__
            raise IntegrityError(f"{labels_path} is not a tiered-ImageNet labels file: expected "
                                 f"a dict with {', '.join(LABEL_KEYS)}, got {keys}")
        labels = {_text(k): v for k, v in labels.items()}
        class_of = np.asarray(labels["label_specific"]).astype(np.int64).reshape(-1)
        category_of = np.asarray(labels["label_general"]).astype(np.int64).reshape(-1)
        names = [_text(n) for n in labels["label_specific_str"]]
        images = load_pickle(images_path)
        if not isinstance(images, (list, np.ndarray)):
            raise IntegrityError(f"{images_path} must hold a list of PNG-encoded images, got "
                                 f"{type(images).__name__}")
        self._check_labels(labels_path, len(images), class_of, category_of, names)
        order = np.argsort(class_of, kind="stable")
        decoded, bad = decode_encoded_images([images[i] for i in order], self.image_size,
                                             self.channels, f"Decoding {what}")
        bad_rows = [int(order[position]) for position, _ in bad]
        usable = np.ones(len(class_of), dtype=bool)
        usable[bad_rows] = False
        sizes = np.bincount(class_of[usable], minlength=len(names)).tolist()
        skipped = [(f"{images_path.name}[{row}]", reason)
                   for row, (_, reason) in zip(bad_rows, bad, strict=True)]
        return StoredSplit(decoded, names, sizes, skipped=skipped)

    def _check_labels(self, path: Path, n_images: int, class_of: np.ndarray,
                      category_of: np.ndarray, names: list[str]) -> None:
        split = self.split
        if len(class_of) != n_images or len(category_of) != n_images:
            raise IntegrityError(f"{path}: {len(class_of)} class labels and {len(category_of)} "
                                 f"category labels for {n_images} images")
        if n_images == 0 or class_of.min() < 0 or class_of.max() >= len(names):
            raise IntegrityError(f"{path}: class labels must index the {len(names)} class names")
        want = self.expected_classes[split]
        if len(names) != want or len(set(names)) != len(names):
            raise IntegrityError(
                f"{path} does not look like tiered-ImageNet's {split!r} split: expected {want} "
                f"distinct classes, found {len(set(names))}. The copy may be incomplete or of "
                "another split: download or extract it again.")
        empty = [names[c] for c in range(len(names)) if not np.any(class_of == c)]
        if empty:
            raise IntegrityError(f"{path}: classes without images: {', '.join(empty[:10])}")
        # Every class lies in one category; the split has its number of categories.
        categories = {c: set(category_of[class_of == c].tolist()) for c in range(len(names))}
        torn = [names[c] for c, cats in categories.items() if len(cats) != 1]
        if torn:
            raise IntegrityError(f"{path}: classes labelled with several categories: "
                                 f"{', '.join(torn[:10])}")
        n_categories = len({next(iter(cats)) for cats in categories.values()})
        if n_categories != self.expected_categories[split]:
            raise IntegrityError(
                f"{path}: the {split!r} split should group its classes into "
                f"{self.expected_categories[split]} categories, found {n_categories}")

    def _required_split(self, class_split: str | Path | None) -> dict[str, dict[str, str]] | None:
        if class_split in (None, "ren"):
            return None
        folder = Path(class_split)
        if not folder.is_dir():
            raise ValueError(f"class_split must be None, 'ren' or a folder of split files "
                             f"(train.csv, val.csv, test.csv); got {str(class_split)!r}")
        required = {s: read_split_csv(folder / f"{s}.csv") for s in SPLITS}
        check_disjoint_splits({s: dict.fromkeys(c, 1) for s, c in required.items()},
                              f"tiered-ImageNet class split {folder}")
        return required

    def _check_against(self, required: dict[str, dict[str, str]], class_split: Any) -> None:
        want = set(required[self.split])
        have = set(self.classes)
        if want != have:
            missing, extra = sorted(want - have), sorted(have - want)
            raise IntegrityError(
                f"the {self.split!r} split of tiered-ImageNet in {self.root} does not have the "
                f"classes of {class_split}/{self.split}.csv: missing {missing[:10]}, "
                f"unexpected {extra[:10]}")
