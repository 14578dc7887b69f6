"""Small fake datasets in the exact on-disk formats of the real distributions.

Class names come from the real split files in ``../shared/data/splits`` when they are there
(never copied into the repository), else they are made up with the same counts.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "splits"
SPLIT_SIZES = {"train": 64, "val": 16, "test": 20}


def ravi_classes() -> dict[str, list[str]]:
    """mini-ImageNet's class names per split (Ravi & Larochelle CSVs, or made-up wnids)."""
    folder = SPLITS_DIR / "mini_imagenet"
    if (folder / "train.csv").is_file():
        classes = {}
        for split in SPLIT_SIZES:
            with open(folder / f"{split}.csv", newline="") as f:
                classes[split] = sorted({row["label"] for row in csv.DictReader(f)})
        return classes
    names = iter(f"n{i:08d}" for i in range(100))
    return {split: [next(names) for _ in range(n)] for split, n in SPLIT_SIZES.items()}


def cifar_fs_split() -> dict[str, list[list[str]]]:
    """CIFAR-FS's [coarse, fine] class pairs per split (the published JSON, or made up)."""
    folder = SPLITS_DIR / "cifar_fs"
    if (folder / "train.json").is_file():
        return {split: json.loads((folder / f"{split}.json").read_text()) for split in SPLIT_SIZES}
    names = iter([f"coarse{i // 5}", f"fine_class_{i}"] for i in range(100))
    return {split: [next(names) for _ in range(n)] for split, n in SPLIT_SIZES.items()}


def image_bytes(rng: np.random.Generator, size: tuple[int, int] = (24, 20), mode: str = "RGB",
                fmt: str = "JPEG") -> bytes:
    """An encoded random image of ``size`` (width, height) in ``mode``."""
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def mini_imagenet_files(images_per_class: int, seed: int = 0) -> dict[str, bytes]:
    """``{relative path: jpeg}`` of MAML++'s layout: ``{split}/<class>/<class><i>.jpg``."""
    rng = np.random.default_rng(seed)
    files = {}
    for split, classes in ravi_classes().items():
        for name in classes:
            for i in range(images_per_class):
                files[f"{split}/{name}/{name}{i:08d}.jpg"] = image_bytes(rng, (24, 20))
    return files


def write_mini_imagenet_tarball(path: Path, images_per_class: int = 4, seed: int = 0,
                                top: str = "mini_imagenet_full_size") -> Path:
    """The ``mini_imagenet_full_size.tar.bz2``-style archive (here gzip, for speed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in mini_imagenet_files(images_per_class, seed).items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_mini_imagenet_folders(root: Path, images_per_class: int = 4, seed: int = 0) -> Path:
    for name, data in mini_imagenet_files(images_per_class, seed).items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def write_mini_imagenet_pickles(root: Path, images_per_class: int = 4, size: int = 84,
                                seed: int = 0, splits=("train", "val", "test")) -> dict[str, dict]:
    """``mini-imagenet-cache-{split}.pkl``; returns the pickled dicts for comparison."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in splits:
        classes = ravi_classes()[split]
        n = len(classes) * images_per_class
        # Interleaved, not class-major, so a loader that ignores class_dict gets it wrong.
        order = rng.permutation(n)
        data = {
            "image_data": rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8),
            "class_dict": {name: sorted(order[c * images_per_class:(c + 1) * images_per_class]
                                        .tolist()) for c, name in enumerate(classes)},
        }
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump(data, f, protocol=4)
        written[split] = data
    return written


def write_cifar100_archive(root: Path, train_per_class: int = 5, test_per_class: int = 1,
                           seed: int = 0) -> dict[str, dict]:
    """``cifar-100-python.tar.gz`` with pickled ``train``/``test``/``meta`` dicts (bytes keys)."""
    rng = np.random.default_rng(seed)
    pairs = [pair for split in SPLIT_SIZES for pair in cifar_fs_split()[split]]
    coarse_names = sorted({c for c, _ in pairs})
    fine_names = sorted(f for _, f in pairs)
    parts = {}
    for part, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = rng.permutation(np.repeat(np.arange(100), per_class))
        parts[part] = {
            b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
            b"fine_labels": labels.tolist(),
            b"coarse_labels": [0] * len(labels),
            b"data": rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8),
        }
    parts["meta"] = {b"fine_label_names": [n.encode() for n in fine_names],
                     b"coarse_label_names": [n.encode() for n in coarse_names]}
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        for part, content in parts.items():
            data = pickle.dumps(content, protocol=2)
            info = tarfile.TarInfo(f"cifar-100-python/{part}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return parts


def write_cifar_fs_split(folder: Path) -> Path:
    """The three split JSON files, byte for byte when the real ones are available."""
    folder.mkdir(parents=True, exist_ok=True)
    real = SPLITS_DIR / "cifar_fs"
    for split, pairs in cifar_fs_split().items():
        source = real / f"{split}.json"
        data = source.read_bytes() if source.is_file() else json.dumps(pairs).encode()
        (folder / f"{split}.json").write_bytes(data)
    return folder


TIERED_SIZES = {"train": (351, 20), "val": (97, 6), "test": (160, 8)}


def tiered_classes() -> dict[str, dict[str, str]]:
    """tiered-ImageNet's ``{class: category}`` per split (the authors' CSVs, or made up)."""
    folder = SPLITS_DIR / "tiered_imagenet"
    if (folder / "train.csv").is_file():
        classes = {}
        for split in TIERED_SIZES:
            with open(folder / f"{split}.csv", newline="") as f:
                classes[split] = {row[0]: row[1] for row in csv.reader(f) if row}
        return classes
    names = iter(f"n{i:08d}" for i in range(608))
    categories = iter(f"n9{i:07d}" for i in range(34))
    made_up = {}
    for split, (n_classes, n_categories) in TIERED_SIZES.items():
        cats = [next(categories) for _ in range(n_categories)]
        made_up[split] = {next(names): cats[i % n_categories] for i in range(n_classes)}
    return made_up


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_tiered_imagenet_pickles(root: Path, images_per_class: int = 2, size: int = 12,
                                  prefix: str = "tiered-imagenet-", seed: int = 0,
                                  splits=("train", "val", "test")) -> dict[str, dict]:
    """``{prefix}{split}_images_png.pkl`` and ``{prefix}{split}_labels.pkl`` as the authors
    wrote them: a list of uint8 arrays holding PNGs, and the label dict. Images are shuffled
    (not class-major). Returns ``{split: {"pixels": [N, size, size, 3], "labels": dict}}``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split in splits:
        classes = tiered_classes()[split]
        names = list(classes)
        category_names = sorted(set(classes.values()))
        n = len(names) * images_per_class
        class_of = rng.permutation(np.repeat(np.arange(len(names)), images_per_class))
        pixels = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
        # Some arrays squeezable [L, 1], as np.squeeze in readers of the original suggests.
        images = [np.frombuffer(png_bytes(p), dtype=np.uint8).reshape((-1, 1) if i % 2 else (-1,))
                  for i, p in enumerate(pixels)]
        labels = {
            "label_specific": class_of,
            "label_specific_str": names,
            "label_general": np.array([category_names.index(classes[names[c]]) for c in class_of]),
            "label_general_str": category_names,
        }
        with open(root / f"{prefix}{split}_images_png.pkl", "wb") as f:
            pickle.dump(images, f, protocol=2)
        with open(root / f"{prefix}{split}_labels.pkl", "wb") as f:
            pickle.dump(labels, f, protocol=2)
        written[split] = {"pixels": pixels, "labels": labels}
    return written


# A fake FC100 split by whole CIFAR-100 superclasses (12 / 4 / 4); the real one differs.
FC100_FAKE_SUPERCLASSES = {"train": range(0, 12), "val": range(12, 16), "test": range(16, 20)}


def write_fc100_pickles(root: Path, images_per_class: int = 3, seed: int = 0,
                        superclasses=None) -> dict[str, dict]:
    """``FC100_{split}.pickle`` as MetaOptNet's: ``{"data": uint8 [N, 32, 32, 3], "labels":
    [fine label per image]}``, shuffled."""
    from fewshot.data.fc100 import CIFAR100_COARSE_OF

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, coarse in (superclasses or FC100_FAKE_SUPERCLASSES).items():
        fine = [f for f in range(100) if CIFAR100_COARSE_OF[f] in coarse]
        labels = rng.permutation(np.repeat(fine, images_per_class)).tolist()
        data = {"data": rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8),
                "labels": labels}
        with open(root / f"FC100_{split}.pickle", "wb") as f:
            pickle.dump(data, f, protocol=2)
        written[split] = data
    return written
