"""The user's own images: one folder per class, split by folders, split files or a seeded draw.

Two layouts, as in the original project (and MAML++'s data provider):

- ``root/{train,val,test}/<class>/<images>``: the splits are given (folder names in any case,
  ``Train/Val/Test`` as the original project drew them; ``valid/`` or ``validation/`` for
  val);
- ``root/<class>/<images>``: the classes are split by ``class_split``, either a seeded random
  draw (``"random"``, 64% / 16% / 20% of the classes as in mini-ImageNet) or a folder holding
  ``train.txt``, ``val.txt`` and ``test.txt`` with one class folder name per line.

Images may be in any format PIL reads, of mixed sizes and modes; they are converted to
grayscale or RGB (``channels``) and resized to ``image_size`` once, then served from the cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fewshot.data.class_images import (
    SPLITS,
    CachedClassImages,
    check_disjoint_splits,
    check_image_options,
    check_split_name,
    file_entries,
)
from fewshot.data.download import DatasetNotFoundError
from fewshot.data.image_decoding import ImageSource, check_resize_policy, decode_image_files
from fewshot.data.split_cache import StoredSplit, cache_root

__all__ = ["ImageFolder", "decode_class_folders", "list_class_folders", "split_folders_of"]

# Files that operating systems leave in folders; never images, never worth an error.
_SYSTEM_FILES = {"thumbs.db", "desktop.ini", "__macosx"}


def _is_ignored(relative: Path) -> bool:
    return any(part.startswith(".") or part.lower() in _SYSTEM_FILES for part in relative.parts)


def list_class_folders(directory: Path) -> dict[str, list[Path]]:
    """``{class folder name: sorted files under it}``; hidden entries and OS files are left out.

    Every other file counts as an image of its class, so a stray document is reported as a
    bad image rather than silently ignored.
    """
    classes: dict[str, list[Path]] = {}
    for folder in sorted(directory.iterdir()):
        if folder.is_dir() and not _is_ignored(Path(folder.name)):
            classes[folder.name] = sorted(
                path for path in folder.rglob("*")
                if path.is_file() and not _is_ignored(path.relative_to(folder)))
    return classes


# Folder names read as each split, in any case: the original project drew its layout as
# Train|Val|Test, other datasets ship valid/ or validation/.
SPLIT_FOLDER_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"),
                      "test": ("test",)}


def split_folders_of(root: Path) -> dict[str, Path] | None:
    """``{split: folder}`` if ``root`` uses the split-folder layout, else None.

    ``Train/``, ``train/`` and ``TRAIN/`` are the train split; ``val/``, ``valid/`` and
    ``validation/`` (any case) the validation split. A root holding two spellings of one
    split is refused, naming both: which one is meant cannot be guessed.
    """
    split_of = {name: split for split, names in SPLIT_FOLDER_NAMES.items() for name in names}
    found: dict[str, list[Path]] = {}
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        split = split_of.get(entry.name.lower())
        if split is not None and entry.is_dir():
            found.setdefault(split, []).append(entry)
    for split, folders in found.items():
        if len(folders) > 1:
            raise ValueError(
                f"{root} has {len(folders)} folders for the {split!r} split: "
                f"{' and '.join(f.name + '/' for f in folders)}; keep one (or merge them)")
    return {split: folders[0] for split, folders in found.items()} or None


def decode_class_folders(classes: dict[str, Sequence[ImageSource]], image_size: int,
                         channels: int, description: str, resize: str = "squash") -> StoredSplit:
    """Decode every class's files (or zip members) into a :class:`StoredSplit`, recording
    unreadable files."""
    names = list(classes)
    files = [path for name in names for path in classes[name]]
    images, bad = decode_image_files(files, image_size, channels, description, resize)
    bad_paths = {path for path, _ in bad}
    sizes = [sum(str(p) not in bad_paths for p in classes[name]) for name in names]
    return StoredSplit(images, names, sizes, skipped=bad)


def _read_class_list(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"Split file {path} does not exist")
    names = [line.strip() for line in path.read_text().splitlines()]
    return [n for n in names if n and not n.startswith("#")]


class ImageFolder(CachedClassImages):
    """A few-shot dataset from folders of images, one folder per class (see module docstring).

    Args:
        root: the dataset folder.
        split: ``train``, ``val`` or ``test``.
        class_split: None (the split folders if ``root`` has them, else ``"random"``),
            ``"folders"``, ``"random"``, or a folder with ``train.txt``/``val.txt``/``test.txt``.
        image_size: images are resized to ``image_size x image_size``.
        channels: 1 (grayscale) or 3 (RGB).
        cache_dir: writable folder for the decoded cache (default ``$FEWSHOT_CACHE_DIR`` or
            ``~/.cache/fewshot``).
        skip_bad_images: leave unreadable files out with one warning instead of failing.
        split_seed: seed of the ``"random"`` class split.
        split_fractions: train/val/test shares of the classes for ``"random"``.
        transform, target_transform: applied to each image / class id by ``__getitem__`` and
            ``load_class_images`` (images are float ``[C, S, S]`` in ``[0, 1]``).
        download: user data cannot be downloaded; True is an error.
        resize: how a non-square image becomes square: ``squash`` (resize it whole),
            ``crop`` (the centred square) or ``pad`` (white margins); recorded in the trained
            model, so ``fewshot adapt`` prepares new images the same way.

    Example:
        >>> ImageFolder("my_data", split="train", image_size=84, channels=3)  # doctest: +SKIP
        ImageFolder(split='train', classes=40, images=2400, image_size=84, channels=3)
    """

    # Taken to be photos: decoded pixels scaled to [0, 1], nothing more.
    preprocessing = {"invert": False, "mean": (0.0,), "std": (1.0,)}
    # The class splits this dataset knows by name.
    named_class_splits = ("folders", "random")

    def __init__(self, root: str | Path, split: str = "train", class_split: str | Path | None = None,
                 image_size: int = 84, channels: int = 3, cache_dir: str | Path | None = None,
                 skip_bad_images: bool = False, split_seed: int = 0,
                 split_fractions: tuple[float, float, float] = (0.64, 0.16, 0.20),
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 download: bool = False, resize: str = "squash") -> None:
        check_split_name(split)
        check_image_options(image_size, channels)
        check_resize_policy(resize)
        if download:
            raise ValueError("dataset 'folder' is your own data and cannot be downloaded; "
                             "set download=False")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DatasetNotFoundError(
                f"Image folder {self.root} does not exist. Point root at a folder laid out as "
                "root/{train,val,test}/<class>/<images> or root/<class>/<images>.")
        self.split, self.image_size, self.channels = split, image_size, channels
        self.class_split = class_split
        self.transform, self.target_transform = transform, target_transform
        splits = self._split_classes(class_split, split_seed, split_fractions)
        check_disjoint_splits({s: {c: len(f) for c, f in classes.items()}
                               for s, classes in splits.items()}, str(self.root))
        classes = splits[split]
        what = f"the {split!r} split of {self.root}"
        if not classes:
            raise DatasetNotFoundError(f"{what} has no class folders")
        files = [path for name in classes for path in classes[name]]
        source = [str(self.root.resolve()), f"resize:{resize}", *classes,
                  *file_entries(files, self.root)]
        self.resize = resize
        self._use_cache(
            cache_root(cache_dir) / "folder", "folder", split, source,
            lambda: decode_class_folders(classes, image_size, channels, f"Decoding {what}",
                                         resize),
            skip_bad_images, what)

    def _split_classes(self, class_split: str | Path | None, seed: int,
                       fractions: tuple[float, float, float]) -> dict[str, dict[str, list[Path]]]:
        folders = split_folders_of(self.root)
        if class_split is None:
            class_split = "folders" if folders else "random"
        if class_split == "folders":
            if folders is None:
                raise DatasetNotFoundError(
                    f"{self.root} has no train/, val/ or test/ folders (any case; valid/ and "
                    "validation/ count as val/); use class_split='random' "
                    "or a folder of split files for a single root/<class>/ tree")
            return {s: list_class_folders(folders[s]) if s in folders else {} for s in SPLITS}
        if folders is not None:
            raise ValueError(
                f"{self.root} already has split folders ({', '.join(folders)}); class_split="
                f"{str(class_split)!r} is for a single root/<class>/ tree. Use class_split='folders'.")
        everything = list_class_folders(self.root)
        if class_split == "random":
            assignment = _random_split(sorted(everything), seed, fractions, self.root)
        elif Path(class_split).is_dir():
            assignment = {s: _read_class_list(Path(class_split) / f"{s}.txt") for s in SPLITS}
            unknown = [n for names in assignment.values() for n in names if n not in everything]
            if unknown:
                raise ValueError(f"split files in {class_split} name class folders that are not "
                                 f"in {self.root}: {', '.join(unknown[:10])}")
        else:
            raise ValueError(f"class_split must be None, 'folders', 'random' or a folder of split "
                             f"files (train.txt, val.txt, test.txt); got {str(class_split)!r}")
        for names in assignment.values():
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"split files in {class_split} list {repeated[:10]} twice")
        return {s: {n: everything[n] for n in names} for s, names in assignment.items()}


def _random_split(names: list[str], seed: int, fractions: tuple[float, float, float],
                  root: Path) -> dict[str, list[str]]:
    if len(fractions) != 3 or min(fractions) <= 0:
        raise ValueError(f"split_fractions must be three positive shares, got {fractions}")
    total = sum(fractions)
    n_val = max(1, round(len(names) * fractions[1] / total))
    n_test = max(1, round(len(names) * fractions[2] / total))
    if len(names) - n_val - n_test < 1:
        raise ValueError(f"{root} has {len(names)} class folder(s); a random train/val/test "
                         "split needs at least 3")
    # RandomState's stream is frozen by numpy, so the split is stable across versions.
    order = [names[i] for i in np.random.RandomState(seed).permutation(len(names))]
    n_train = len(names) - n_val - n_test
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
             "test": order[n_train + n_val:]}
    return {split: sorted(part) for split, part in parts.items()}
