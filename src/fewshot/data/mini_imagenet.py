"""mini-ImageNet (Vinyals et al., 2016) with the Ravi & Larochelle (2017) class split.

64 / 16 / 20 classes of 600 images for train / val / test. There is no official download;
``download=True`` fetches the pickles from the public mirror learn2learn uses
(:mod:`fewshot.data.mirror`), resumably, and records their SHA-256 to check them on later use.
The data is read from ``root`` in either of its two common distributions:

- the pickled cache ``mini-imagenet-cache-{train,val,test}.pkl`` (the mirror names the
  validation file ``...-validation.pkl``; both names are read): a dict with ``image_data``
  (uint8 ``[N, 84, 84, 3]``) and ``class_dict`` (``{class: [indices]}``), loaded with a
  restricted unpickler that cannot run code (:mod:`fewshot.data.safe_pickle`);
- the folders ``{train,val,test}/<class>/<image>.jpg`` of MAML++'s
  ``mini_imagenet_full_size.tar.bz2`` (directly in ``root`` or in one subfolder), or that
  archive itself (or any tar/zip of those folders), which is safely extracted into ``root``.
"""

from __future__ import annotations

from collections.abc import Callable
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
from fewshot.data.download import (
    DatasetNotFoundError,
    IntegrityError,
    check_download,
    extract_archive,
)
from fewshot.data.image_decoding import check_resize_policy, prepare_image_array
from fewshot.data.image_folder import decode_class_folders, list_class_folders, split_folders_of
from fewshot.data.mirror import download_from_mirror
from fewshot.data.safe_pickle import load_pickle
from fewshot.data.split_cache import StoredSplit, cache_root

__all__ = ["MiniImageNet"]

_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".zip")

WHERE_TO_GET_IT = (
    "mini-ImageNet has no official download. download=True (--data.download true) fetches "
    "the three pickles from the public mirror learn2learn uses (Zenodo record 7978538, or "
    "$FEWSHOT_MIRROR_URL). Or get either the pickles "
    "mini-imagenet-cache-{train,val,test}.pkl, or mini_imagenet_full_size.tar.bz2 from the "
    "MAML++ repository's README (github.com/AntreasAntoniou/HowToTrainYourMAMLPytorch, "
    "'Datasets' section; you accept the ImageNet terms of use), and put them in root (the "
    "archive may also be extracted there). The class split must be Ravi & Larochelle's "
    "(64/16/20 classes), as in both distributions."
)


class MiniImageNet(CachedClassImages):
    """One split of mini-ImageNet, decoded once into a cached uint8 array (module docstring).

    Args:
        root: folder with the pickles, the split folders, or an archive of the folders.
        split: ``train``, ``val`` or ``test``.
        class_split: ``None`` or ``"ravi"``: the split the distribution comes with (the only
            one in use for mini-ImageNet).
        image_size: images are resized to ``image_size x image_size`` (84 in the literature).
        channels: 3 (RGB) or 1 (grayscale).
        download: fetch the three pickles from the mirror (:mod:`fewshot.data.mirror`) when
            ``root`` holds neither pickles nor split folders nor an archive.
        cache_dir: writable folder for the decoded cache (default ``$FEWSHOT_CACHE_DIR`` or
            ``~/.cache/fewshot``), so ``root`` may be read-only once extracted.
        skip_bad_images: leave unreadable image files out with one warning instead of failing.
        transform, target_transform: as in torchvision, applied per image / class id.
        split_seed: accepted for a uniform interface; the class split is fixed.
        resize: how the full-size JPEGs of the folder distribution become square (``squash``,
            ``crop`` or ``pad``); the pickles are square already.

    Example:
        >>> train = MiniImageNet("data/mini_imagenet", split="train")  # doctest: +SKIP
        >>> train.load_class_images(0, [0, 1]).shape  # doctest: +SKIP
        torch.Size([2, 3, 84, 84])
    """

    pickle_name = "mini-imagenet-cache-{split}.pkl"
    # The names the mirror gives the three pickles (its validation file says so in full).
    mirror_files = {"train": "mini-imagenet-cache-train.pkl",
                    "val": "mini-imagenet-cache-validation.pkl",
                    "test": "mini-imagenet-cache-test.pkl"}
    expected_classes = {"train": 64, "val": 16, "test": 20}
    images_per_class = 600
    # Photos: decoded pixels scaled to [0, 1], nothing more.
    preprocessing = {"invert": False, "mean": (0.0,), "std": (1.0,)}
    # The class splits this dataset knows by name.
    named_class_splits = ("ravi",)

    def __init__(self, root: str | Path, split: str = "train", class_split: str | None = None,
                 image_size: int = 84, channels: int = 3, download: bool = False,
                 cache_dir: str | Path | None = None, skip_bad_images: bool = False,
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 split_seed: int = 0, resize: str = "squash") -> None:
        check_split_name(split)
        check_image_options(image_size, channels)
        check_resize_policy(resize)
        if class_split not in (None, "ravi"):
            raise ValueError(f"mini-ImageNet comes with Ravi & Larochelle's class split; "
                             f"class_split must be None or 'ravi', got {class_split!r}")
        self.root = Path(root).expanduser()
        self.split, self.image_size, self.channels = split, image_size, channels
        self.transform, self.target_transform = transform, target_transform
        cache = cache_root(cache_dir) / "mini_imagenet"
        what = f"the {split!r} split of mini-ImageNet in {self.root}"
        pickle_path = self._pickle_path(split)
        if pickle_path is None and download and self._find_split_folders() is None \
                and not self._archives():
            download_from_mirror(list(self.mirror_files.values()), self.root)
            pickle_path = self._pickle_path(split)
        if pickle_path is not None:
            check_download(pickle_path)  # a downloaded pickle must still be what was downloaded
            st = pickle_path.stat()
            source = [f"pickle:{pickle_path.name}:{st.st_size}:{st.st_mtime_ns}"]
            self._use_cache(cache, "mini_imagenet", split, source,
                            lambda: self._from_pickle(pickle_path), skip_bad_images, what)
            return
        folders = self._split_folders(download)
        splits = {s: list_class_folders(folders[s]) if s in folders else {} for s in SPLITS}
        check_disjoint_splits({s: {c: len(f) for c, f in classes.items()}
                               for s, classes in splits.items()}, str(self.root))
        classes = splits[split]
        self._check_structure(folders.get(split, self.root / split),
                              {c: len(f) for c, f in classes.items()})
        files = [path for name in classes for path in classes[name]]
        source = ["folders", f"resize:{resize}", *file_entries(files, folders[split].parent)]
        self._use_cache(cache, "mini_imagenet", split, source,
                        lambda: decode_class_folders(classes, image_size, channels,
                                                     f"Decoding {what}", resize),
                        skip_bad_images, what)

    def _pickle_path(self, split: str) -> Path | None:
        """The split's pickle in ``root`` under either name, or None."""
        for name in (self.pickle_name.format(split=split), self.mirror_files[split]):
            if (self.root / name).is_file():
                return self.root / name
        return None

    def _archives(self) -> list[Path]:
        return sorted(p for p in self.root.glob("*")
                      if p.is_file() and p.name.lower().endswith(_ARCHIVE_SUFFIXES))

    def _split_folders(self, download: bool) -> dict[str, Path]:
        folders = self._find_split_folders()
        if folders is None:
            archives = self._archives()
            if len(archives) > 1:
                raise DatasetNotFoundError(f"{self.root} holds several archives "
                                           f"({', '.join(a.name for a in archives)}); keep one")
            if archives:
                try:
                    extract_archive(archives[0], self.root)
                except PermissionError as exc:
                    raise DatasetNotFoundError(
                        f"Cannot extract {archives[0]} into {self.root} ({exc}); extract it "
                        "yourself, or copy it to a writable folder and point root there") from exc
                folders = self._find_split_folders()
        if folders is None:
            looked = (f"looked for {self.pickle_name.format(split=self.split)}, "
                      f"{self.split}/<class>/ folders and a tar/zip archive")
            raise DatasetNotFoundError(f"mini-ImageNet not found in {self.root} ({looked}). "
                                       f"{WHERE_TO_GET_IT}")
        return folders

    def _find_split_folders(self) -> dict[str, Path] | None:
        if not self.root.is_dir():
            return None
        if found := split_folders_of(self.root):
            return found
        # Archives usually unpack into one folder (mini_imagenet_full_size/train/...).
        nested = [d for d in self.root.iterdir() if d.is_dir() and not d.name.startswith(".")]
        found = [f for f in map(split_folders_of, nested) if f]
        if len(found) > 1:
            raise DatasetNotFoundError(f"{self.root} holds several mini-ImageNet copies "
                                       f"({', '.join(str(d) for d in nested)}); keep one")
        return found[0] if found else None

    def _check_structure(self, folder: Path, counts: dict[str, int]) -> None:
        want, per = self.expected_classes[self.split], self.images_per_class
        wrong = [f"{name} ({n})" for name, n in counts.items() if n != per]
        if len(counts) != want or wrong:
            detail = f"; classes with other counts: {', '.join(wrong[:10])}" if wrong else ""
            raise IntegrityError(
                f"{folder} does not look like mini-ImageNet's {self.split!r} split: expected "
                f"{want} class folders with {per} images each, found {len(counts)} class "
                f"folders{detail}. The copy may be incomplete: extract or download it again.")

    def _from_pickle(self, path: Path) -> StoredSplit:
        data = load_pickle(path)
        if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(data):
            keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
            raise IntegrityError(f"{path} is not a mini-ImageNet cache: expected a dict with "
                                 f"'image_data' and 'class_dict', got {keys}")
        images, class_dict = data["image_data"], data["class_dict"]
        if (not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4
                or images.shape[-1] != 3 or not isinstance(class_dict, dict)):
            shape = getattr(images, "shape", None)
            raise IntegrityError(f"{path}: image_data must be uint8 [N, H, W, 3] and class_dict "
                                 f"a dict, got {getattr(images, 'dtype', type(images))} {shape}")
        names = sorted(class_dict)
        counts = {name: len(class_dict[name]) for name in names}
        self._check_structure(path, counts)
        order = np.concatenate([np.asarray(class_dict[n], dtype=np.int64) for n in names])
        if order.min() < 0 or order.max() >= len(images) or len(np.unique(order)) != len(order):
            raise IntegrityError(f"{path}: class_dict indices are out of range for "
                                 f"{len(images)} images or used twice")
        converted = prepare_image_array(images[order], self.image_size, self.channels)
        return StoredSplit(converted, names, [counts[n] for n in names])
