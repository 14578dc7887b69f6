"""CIFAR-FS (Bertinetto et al., ICLR 2019): CIFAR-100 re-split by class into 64 / 16 / 20.

Every class has CIFAR-100's 600 images (500 from its training file, then 100 from its test
file), 32x32 RGB. The images come from the official archive ``cifar-100-python.tar.gz``
(downloaded with its md5, or read from ``root``; the pickles inside are read with a restricted
unpickler). The class split comes from the CIFAR-FS authors' split as published in
torchmeta's assets (pinned commit and md5, fetched into ``root/cifar-fs-splits/``), or from a
folder of split files the user points ``class_split`` at.
"""

from __future__ import annotations

import json
import tarfile
import zlib
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
    file_entries,
)
from fewshot.data.download import DatasetNotFoundError, IntegrityError, download_url, md5sum
from fewshot.data.image_decoding import prepare_image_array
from fewshot.data.safe_pickle import load_pickle
from fewshot.data.split_cache import StoredSplit, cache_root

__all__ = ["CIFARFS"]

_SPLIT_COMMIT = "d55d89ebd47f340180267106bde3e4b723f23762"


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _read_split_file(folder: Path, split: str) -> list[str]:
    """Fine class names from ``split.json`` ([coarse, fine] pairs or names) or ``split.txt``."""
    json_path, txt_path = folder / f"{split}.json", folder / f"{split}.txt"
    if json_path.is_file():
        try:
            entries = json.loads(json_path.read_text())
        except json.JSONDecodeError as exc:
            raise IntegrityError(f"{json_path} is not valid JSON ({exc})") from exc
        if not isinstance(entries, list):
            raise IntegrityError(f"{json_path} must hold a list of class names or "
                                 f"[coarse, fine] pairs")
        return [e[-1] if isinstance(e, list) else str(e) for e in entries]
    if txt_path.is_file():
        return [line.strip() for line in txt_path.read_text().splitlines() if line.strip()]
    raise FileNotFoundError(f"Split file {json_path} (or {txt_path.name}) does not exist")


class CIFARFS(CachedClassImages):
    """One split of CIFAR-FS, decoded once into a cached uint8 array (see module docstring).

    Args:
        root: folder holding ``cifar-100-python.tar.gz`` or its extracted ``cifar-100-python/``.
        split: ``train``, ``val`` or ``test``.
        class_split: None or ``"bertinetto"`` (the published CIFAR-FS split, read from
            ``root/cifar-fs-splits/``, fetched there with ``download=True``), or a folder with
            ``train``/``val``/``test`` ``.json`` (lists of ``[coarse, fine]`` or fine names) or
            ``.txt`` (one fine name per line).
        image_size: images are resized to ``image_size x image_size`` (32: unchanged).
        channels: 3 (RGB) or 1 (grayscale).
        download: fetch the CIFAR-100 archive and the split files if missing (md5-checked).
        cache_dir: writable folder for the decoded cache (default ``$FEWSHOT_CACHE_DIR`` or
            ``~/.cache/fewshot``).
        skip_bad_images: accepted for a uniform interface; CIFAR has no image files to skip.
        transform, target_transform: as in torchvision, applied per image / class id.
        split_seed: accepted for a uniform interface; the class splits are fixed or given.

    Example:
        >>> test = CIFARFS("data/cifar_fs", split="test", download=True)  # doctest: +SKIP
        >>> len(test.classes), test.class_sizes[0]  # doctest: +SKIP
        (20, 600)
    """

    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    md5 = "eb9058c3a382ffc7106e4002c42a8d85"
    archive_name = "cifar-100-python.tar.gz"
    folder_name = "cifar-100-python"
    split_folder_name = "cifar-fs-splits"
    split_urls = {s: f"https://raw.githubusercontent.com/tristandeleu/pytorch-meta/{_SPLIT_COMMIT}/"
                     f"torchmeta/datasets/assets/cifar100/cifar-fs/{s}.json" for s in SPLITS}
    split_md5s = {"train": "aa6ebf5d578b10e8867ea2421c3aeee5",
                  "val": "c6b45a88282371b18abc1b9b12eaf451",
                  "test": "7e0f0cae4d694501fce2c2d45ac5241d"}
    expected_classes = {"train": 64, "val": 16, "test": 20}
    # Photos: decoded pixels scaled to [0, 1], nothing more.
    preprocessing = {"invert": False, "mean": (0.0,), "std": (1.0,)}
    # The class splits this dataset knows by name.
    named_class_splits = ("bertinetto",)

    def __init__(self, root: str | Path, split: str = "train", class_split: str | Path | None = None,
                 image_size: int = 32, channels: int = 3, download: bool = False,
                 cache_dir: str | Path | None = None, skip_bad_images: bool = False,
                 transform: Callable | None = None, target_transform: Callable | None = None,
                 split_seed: int = 0) -> None:
        check_split_name(split)
        check_image_options(image_size, channels)
        self.root = Path(root).expanduser()
        self.split, self.image_size, self.channels = split, image_size, channels
        self.transform, self.target_transform = transform, target_transform
        splits = self._class_split(class_split, download)
        check_disjoint_splits({s: dict.fromkeys(names, 600) for s, names in splits.items()},
                              f"CIFAR-FS class split {class_split or 'bertinetto'}")
        names = splits[split]
        what = f"the {split!r} split of CIFAR-FS in {self.root}"
        if not names:
            raise DatasetNotFoundError(f"{what} has no classes")
        source = self._source(download)
        entries = ([f"archive:{source.name}:{source.stat().st_size}:{source.stat().st_mtime_ns}"]
                   if source.is_file() else
                   file_entries(sorted(p for p in source.iterdir() if p.is_file()), source))
        self._use_cache(cache_root(cache_dir) / "cifar_fs", "cifar_fs", split,
                        [*entries, "classes", *names], lambda: self._decode(source, names),
                        skip_bad_images, what)

    def _class_split(self, class_split: str | Path | None, download: bool) -> dict[str, list[str]]:
        if class_split not in (None, "bertinetto"):
            folder = Path(class_split)
            if not folder.is_dir():
                raise ValueError(f"class_split must be None, 'bertinetto' or a folder of split "
                                 f"files; {folder} is not a folder")
            splits = {s: _read_split_file(folder, s) for s in SPLITS}
            for s, names in splits.items():
                repeated = sorted({n for n in names if names.count(n) > 1})
                if repeated:
                    raise ValueError(f"{folder}: the {s!r} split lists {repeated[:10]} twice")
            return splits
        folder = self.root / self.split_folder_name
        for s in SPLITS:
            path = folder / f"{s}.json"
            if download and not path.is_file():
                download_url(self.split_urls[s], path, self.split_md5s[s])
            if not path.is_file():
                raise DatasetNotFoundError(
                    f"CIFAR-FS split file {path} not found. Use download=True to fetch the "
                    f"published split ({self.split_urls[s]}), or set class_split to a folder "
                    "with train/val/test .json or .txt files.")
            if md5sum(path) != self.split_md5s[s]:
                raise IntegrityError(
                    f"{path} is not the published CIFAR-FS split (md5 {md5sum(path)}, expected "
                    f"{self.split_md5s[s]}); delete it and use download=True, or pass your own "
                    "split folder as class_split.")
        splits = {s: _read_split_file(folder, s) for s in SPLITS}
        for s, names in splits.items():
            if len(names) != self.expected_classes[s]:
                raise IntegrityError(f"{folder / s}.json lists {len(names)} classes, expected "
                                     f"{self.expected_classes[s]}")
        return splits

    def _source(self, download: bool) -> Path:
        archive, folder = self.root / self.archive_name, self.root / self.folder_name
        if folder.is_dir():
            return folder
        if download and not archive.is_file():
            download_url(self.url, archive, self.md5)
        if archive.is_file():
            return archive
        raise DatasetNotFoundError(
            f"CIFAR-100 not found in {self.root} (looked for {archive} and {folder}/). Use "
            f"download=True, or download {self.url} (md5 {self.md5}) into root.")

    def _read_parts(self, source: Path) -> dict[str, dict[str, Any]]:
        parts: dict[str, Any] = {}
        if source.is_dir():
            for part in ("train", "test", "meta"):
                if not (source / part).is_file():
                    raise IntegrityError(f"{source} lacks the file {part!r} of CIFAR-100")
                parts[part] = load_pickle(source / part)
        else:
            parts = self._read_archive(source)
        for part, content in parts.items():
            if not isinstance(content, dict):
                raise IntegrityError(f"{source}: {part!r} is not a CIFAR-100 dict")
        # Python 2 wrote the keys as byte strings; the unpickler may return str or bytes.
        return {part: {_text(k): v for k, v in content.items()} for part, content in parts.items()}

    def _read_archive(self, source: Path) -> dict[str, Any]:
        parts: dict[str, Any] = {}
        try:
            with tarfile.open(source) as tar:
                for part in ("train", "test", "meta"):
                    member = f"{self.folder_name}/{part}"
                    try:
                        stream = tar.extractfile(member)
                    except KeyError:
                        stream = None
                    if stream is None:
                        raise IntegrityError(f"{source} lacks the file {member} of CIFAR-100")
                    with stream:
                        parts[part] = load_pickle(stream, f"{source}:{member}")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            raise IntegrityError(f"{source} is not a readable tar.gz archive ({exc}); delete it "
                                 "and use download=True") from exc
        return parts

    def _decode(self, source: Path, names: list[str]) -> StoredSplit:
        parts = self._read_parts(source)
        fine_names = [_text(n) for n in parts["meta"].get("fine_label_names", [])]
        unknown = [n for n in names if n not in fine_names]
        if unknown:
            raise IntegrityError(f"the {self.split!r} split names classes that CIFAR-100 "
                                 f"({source}) does not have: {', '.join(unknown[:10])}")
        images, labels = [], []
        for part in ("train", "test"):
            data, fine = parts[part].get("data"), parts[part].get("fine_labels")
            if (not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
                    or data.shape[1] != 3 * 32 * 32 or fine is None or len(fine) != len(data)):
                raise IntegrityError(f"{source}: {part!r} is not CIFAR-100 data (expected uint8 "
                                     f"[N, 3072] and N fine labels)")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.append(np.asarray(fine, dtype=np.int64))
        all_images, all_labels = np.concatenate(images), np.concatenate(labels)
        picks = [np.flatnonzero(all_labels == fine_names.index(n)) for n in names]
        converted = prepare_image_array(all_images[np.concatenate(picks)], self.image_size,
                                        self.channels)
        return StoredSplit(converted, list(names), [len(p) for p in picks])
