"""FC100 (Oreshkin et al., NeurIPS 2018): CIFAR-100 split by superclass, so that no superclass
is shared between splits: 12 / 4 / 4 superclasses, 60 / 20 / 20 classes of 600 32x32 images.

Read from the distribution MetaOptNet and learn2learn use: ``FC100_{train,val,test}.pickle``
(each a dict with ``data``, uint8 ``[N, 32, 32, 3]``, and ``labels``, the CIFAR-100 fine label
of every image), in ``root`` or one subfolder, or their archive ``fc100.zip`` (extracted
safely into ``root``). ``download=True`` fetches ``fc100.zip`` (about 160 MB) from the mirror
(:mod:`fewshot.data.mirror`). The split is the distribution's, checked structurally: the class
counts, 600 images per class, disjoint splits, and every split made of whole CIFAR-100
superclasses (and, by the data module, no class in two splits).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fewshot.data.class_images import (
    CachedClassImages,
    check_image_options,
    check_split_name,
)
from fewshot.data.download import (
    DatasetNotFoundError,
    IntegrityError,
    check_download,
    extract_archive,
)
from fewshot.data.image_decoding import prepare_image_array
from fewshot.data.mirror import download_from_mirror
from fewshot.data.safe_pickle import load_pickle
from fewshot.data.split_cache import StoredSplit, cache_root

__all__ = ["CIFAR100_COARSE_OF", "CIFAR100_FINE_NAMES", "FC100"]

# CIFAR-100's fine label names, in label order (its meta file's ``fine_label_names``).
CIFAR100_FINE_NAMES = ["apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm"]
# The superclass (coarse label) of each fine label, as in CIFAR-100's training file.
CIFAR100_COARSE_OF = (
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
    6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
    5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
    16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13)


def _text_keys(data: dict) -> dict[str, Any]:
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in data.items()}


class FC100(CachedClassImages):
    """One split of FC100, cached as uint8 (module docstring).

    Args:
        root: folder with the pickles or ``fc100.zip``.
        split: ``train``, ``val`` or ``test``.
        class_split: None or ``"oreshkin"``: the distribution's superclass split (the only one).
        image_size: images are resized to ``image_size x image_size`` (32: unchanged).
        channels: 3 (RGB) or 1 (grayscale).
        download: fetch ``fc100.zip`` from the mirror when ``root`` has nothing.
        cache_dir: writable folder for the cache (default ``$FEWSHOT_CACHE_DIR`` or
            ``~/.cache/fewshot``).
        skip_bad_images: accepted for a uniform interface (the images are arrays).
        transform, target_transform: as in torchvision, applied per image / class id.
        split_seed: accepted for a uniform interface; the class split is fixed.
    """

    preprocessing = {"invert": False, "mean": (0.0,), "std": (1.0,)}
    named_class_splits = ("oreshkin",)
    pickle_name = "FC100_{split}.pickle"
    archive_name = "fc100.zip"
    expected_classes = {"train": 60, "val": 20, "test": 20}
    images_per_class = 600

    def __init__(self, root: str | Path, split: str = "train", class_split: str | None = None,
                 image_size: int = 32, channels: int = 3, download: bool = False,
                 cache_dir: str | Path | None = None, skip_bad_images: bool = False,
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 split_seed: int = 0) -> None:
        check_split_name(split)
        check_image_options(image_size, channels)
        if class_split not in (None, "oreshkin"):
            raise ValueError(f"FC100 comes with its superclass split; class_split must be None "
                             f"or 'oreshkin', got {class_split!r}")
        self.root = Path(root).expanduser()
        self.split, self.image_size, self.channels = split, image_size, channels
        self.transform, self.target_transform = transform, target_transform
        path = self._pickle(split, download)
        check_download(path)
        what = f"the {split!r} split of FC100 in {path.parent}"
        st = path.stat()
        self._use_cache(cache_root(cache_dir) / "fc100", "fc100", split,
                        [f"{path.name}:{st.st_size}:{st.st_mtime_ns}"],
                        lambda: self._read(path), skip_bad_images, what)

    def _find(self, split: str) -> Path | None:
        name = self.pickle_name.format(split=split)
        candidates = [self.root / name]
        if self.root.is_dir():
            candidates += sorted(d / name for d in self.root.iterdir() if d.is_dir())
        found = [p for p in candidates if p.is_file()]
        if len(found) > 1:
            raise DatasetNotFoundError(f"{self.root} holds several copies of {name} "
                                       f"({', '.join(map(str, found))}); keep one")
        return found[0] if found else None

    def _pickle(self, split: str, download: bool) -> Path:
        found = self._find(split)
        archive = self.root / self.archive_name
        if found is None and not archive.is_file() and download:
            download_from_mirror([self.archive_name], self.root)
        if found is None and archive.is_file():
            check_download(archive)
            extract_archive(archive, self.root)
            found = self._find(split)
        if found is None:
            raise DatasetNotFoundError(
                f"FC100 not found in {self.root} (looked for {self.pickle_name.format(split=split)}"
                f" there and one folder down, and {self.archive_name}). --data.download true "
                "fetches fc100.zip from the mirror learn2learn uses (Zenodo record 7978538), or "
                "put MetaOptNet's FC100_{train,val,test}.pickle there.")
        return found

    def _load(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        data = load_pickle(path)
        data = _text_keys(data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or not {"data", "labels"} <= set(data):
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise IntegrityError(f"{path} is not an FC100 pickle: expected a dict with 'data' "
                                 f"and 'labels', got {keys}")
        images, labels = data["data"], np.asarray(data["labels"]).reshape(-1)
        if (not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4
                or images.shape[-1] != 3 or len(images) != len(labels)):
            raise IntegrityError(f"{path}: 'data' must be uint8 [N, H, W, 3] with one label per "
                                 f"image, got {getattr(images, 'dtype', type(images))} "
                                 f"{getattr(images, 'shape', None)} and {len(labels)} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= 100):
            raise IntegrityError(f"{path}: labels must be CIFAR-100 fine labels (0-99)")
        return images, labels.astype(np.int64)

    def _check_structure(self, path: Path, split: str, labels: np.ndarray) -> list[int]:
        classes, counts = np.unique(labels, return_counts=True)
        want, per = self.expected_classes[split], self.images_per_class
        wrong = [f"{CIFAR100_FINE_NAMES[c]} ({n})" for c, n in zip(classes, counts, strict=True)
                 if n != per]
        if len(classes) != want or wrong:
            detail = f"; classes with other counts: {', '.join(wrong[:10])}" if wrong else ""
            raise IntegrityError(
                f"{path} does not look like FC100's {split!r} split: expected {want} classes "
                f"of {per} images, found {len(classes)}{detail}. The copy may be incomplete: "
                "download or extract it again.")
        superclasses = {CIFAR100_COARSE_OF[c] for c in classes}
        partial = sorted(s for s in superclasses
                         if sum(CIFAR100_COARSE_OF[c] == s for c in classes) != 5)
        if partial:
            raise IntegrityError(
                f"{path}: FC100 splits are made of whole CIFAR-100 superclasses, but the "
                f"{split!r} split holds only part of superclass(es) {partial}")
        return classes.tolist()

    def _read(self, path: Path) -> StoredSplit:
        images, labels = self._load(path)
        classes = self._check_structure(path, self.split, labels)
        order = np.concatenate([np.flatnonzero(labels == c) for c in classes])
        converted = prepare_image_array(images[order], self.image_size, self.channels)
        return StoredSplit(converted, [CIFAR100_FINE_NAMES[c] for c in classes],
                           [int(np.sum(labels == c)) for c in classes])
