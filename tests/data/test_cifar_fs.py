"""CIFAR-FS from a fake CIFAR-100 python archive and the published class split."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_datasets import (
    SPLITS_DIR,
    cifar_fs_split,
    write_cifar100_archive,
    write_cifar_fs_split,
)
from PIL import Image

from fewshot.data import cifar_fs as cifar_fs_module
from fewshot.data.cifar_fs import CIFARFS
from fewshot.data.download import DatasetNotFoundError, IntegrityError
from fewshot.data.safe_pickle import UnsafePickleError

REAL_SPLIT = SPLITS_DIR / "cifar_fs"
needs_real_split = pytest.mark.skipif(not (REAL_SPLIT / "train.json").is_file(),
                                      reason="no shared CIFAR-FS split files")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("cifar")
    return root, write_cifar100_archive(root)


def _image(parts: dict, fine_names: list[str], name: str, part: str, k: int) -> np.ndarray:
    """Image ``k`` of class ``name`` in ``part`` as [32, 32, 3], found independently."""
    label = fine_names.index(name)
    row = [i for i, y in enumerate(parts[part][b"fine_labels"]) if y == label][k]
    return parts[part][b"data"][row].reshape(3, 32, 32).transpose(1, 2, 0)


def test_classes_hold_train_then_test_images(cifar_root, tmp_path):
    root, parts = cifar_root
    split = write_cifar_fs_split(tmp_path / "split")
    ds = CIFARFS(root, "val", class_split=str(split), cache_dir=tmp_path / "c")
    names = [fine for _, fine in cifar_fs_split()["val"]]
    assert ds.classes == names and ds.class_sizes == [6] * 16 and ds.channels == 3
    fine_names = [n.decode() for n in parts["meta"][b"fine_label_names"]]
    images = ds.load_class_images(2, [1, 5])
    want = [_image(parts, fine_names, names[2], "train", 1),
            _image(parts, fine_names, names[2], "test", 0)]
    for got, pixels in zip(images, want, strict=True):
        torch.testing.assert_close(got, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    gray = CIFARFS(root, "val", class_split=str(split), channels=1, image_size=16,
                   cache_dir=tmp_path / "c")
    expected = Image.fromarray(want[0]).convert("L").resize((16, 16), Image.LANCZOS)
    torch.testing.assert_close(gray.load_class_images(2, [1])[0, 0],
                               torch.from_numpy(np.asarray(expected, dtype=np.float32) / 255))


def test_extracted_folder_gives_the_same_images(cifar_root, tmp_path):
    root, _ = cifar_root
    split = write_cifar_fs_split(tmp_path / "split")
    copy = tmp_path / "extracted"
    with tarfile.open(root / "cifar-100-python.tar.gz") as tar:
        tar.extractall(copy, filter="data")
    a = CIFARFS(root, "test", class_split=str(split), cache_dir=tmp_path / "c")
    b = CIFARFS(copy, "test", class_split=str(split), cache_dir=tmp_path / "c")
    torch.testing.assert_close(a.load_class_images(7, range(6)), b.load_class_images(7, range(6)))


@needs_real_split
def test_published_split_is_checked_by_md5(cifar_root, tmp_path):
    root, _ = cifar_root
    data = tmp_path / "data"
    shutil.copytree(root, data)
    shutil.copytree(REAL_SPLIT, data / "cifar-fs-splits")
    train = CIFARFS(data, "train", cache_dir=tmp_path / "c")
    assert len(train.classes) == 64 and train.classes[0] == "dolphin"
    pairs = json.loads((REAL_SPLIT / "val.json").read_text())
    (data / "cifar-fs-splits" / "val.json").write_text(json.dumps(pairs[:-1]))
    with pytest.raises(IntegrityError, match="val.json is not the published CIFAR-FS split"):
        CIFARFS(data, "train", cache_dir=tmp_path / "c")


@needs_real_split
def test_download_fetches_archive_and_split_with_pinned_checksums(cifar_root, tmp_path,
                                                                  monkeypatch):
    root, _ = cifar_root
    fetched = []

    def fake_download(url, destination, md5=None):
        fetched.append((url, md5))
        name = Path(url).name
        source = root / name if name.endswith(".tar.gz") else REAL_SPLIT / name
        Path(destination).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, destination)
        return Path(destination)

    monkeypatch.setattr(cifar_fs_module, "download_url", fake_download)
    data = tmp_path / "data"
    CIFARFS(data, "test", download=True, cache_dir=tmp_path / "c")
    assert ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
            "eb9058c3a382ffc7106e4002c42a8d85") in fetched
    split_urls = [url for url, _ in fetched if url.endswith(".json")]
    assert len(split_urls) == 3 and all("d55d89ebd47f340180267106bde3e4b723f23762" in u
                                        for u in split_urls)
    fetched.clear()
    CIFARFS(data, "val", download=True, cache_dir=tmp_path / "c")
    assert fetched == []  # everything is there now


def test_missing_archive_and_split_say_what_to_do(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="split file .* not found. Use download=True"):
        CIFARFS(tmp_path, "train")
    split = write_cifar_fs_split(tmp_path / "split")
    with pytest.raises(DatasetNotFoundError, match=r"cifar-100-python.tar.gz \(md5 eb9058c3a3"):
        CIFARFS(tmp_path, "train", class_split=str(split))


def test_txt_split_files_and_their_errors(cifar_root, tmp_path):
    root, _ = cifar_root
    split = tmp_path / "split"
    split.mkdir()
    names = {s: [fine for _, fine in pairs] for s, pairs in cifar_fs_split().items()}
    for s in ("train", "val", "test"):
        (split / f"{s}.txt").write_text("\n".join(names[s][:5]) + "\n")
    ds = CIFARFS(root, "train", class_split=str(split), cache_dir=tmp_path / "c")
    assert ds.classes == names["train"][:5]
    (split / "test.txt").write_text(names["train"][0] + "\n")
    with pytest.raises(IntegrityError, match=f"'{names['train'][0]}' in 'train'.*and 'test'"):
        CIFARFS(root, "train", class_split=str(split), cache_dir=tmp_path / "c")
    (split / "test.txt").write_text("unicorn\n")
    with pytest.raises(IntegrityError, match="does not have: unicorn"):
        CIFARFS(root, "test", class_split=str(split), cache_dir=tmp_path / "c")


def test_archive_with_a_hostile_pickle_is_refused(tmp_path):
    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    root = tmp_path / "evil"
    root.mkdir()
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        for part in ("train", "test", "meta"):
            path = tmp_path / part
            path.write_bytes(pickle.dumps({b"data": Hostile()}))
            tar.add(path, f"cifar-100-python/{part}")
    split = write_cifar_fs_split(tmp_path / "split")
    with pytest.raises(UnsafePickleError, match="cifar-100-python/train asks to load"):
        CIFARFS(root, "train", class_split=str(split), cache_dir=tmp_path / "c")
    assert not (tmp_path / "pwned").exists()


def test_truncated_archive_is_named(cifar_root, tmp_path):
    root, _ = cifar_root
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (root / "cifar-100-python.tar.gz").read_bytes()
    (bad / "cifar-100-python.tar.gz").write_bytes(data[: len(data) // 2])
    split = write_cifar_fs_split(tmp_path / "split")
    with pytest.raises(IntegrityError, match="cifar-100-python"):
        CIFARFS(bad, "train", class_split=str(split), cache_dir=tmp_path / "c")
