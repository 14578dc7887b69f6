"""mini-ImageNet from its two distributions: MAML++'s tarball of folders and the pickles."""

from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
import torch
from fake_datasets import (
    SPLIT_SIZES,
    SPLITS_DIR,
    ravi_classes,
    write_mini_imagenet_folders,
    write_mini_imagenet_pickles,
    write_mini_imagenet_tarball,
)
from PIL import Image

from fewshot.data import mini_imagenet as mini_imagenet_module
from fewshot.data.download import DatasetNotFoundError, IntegrityError
from fewshot.data.mini_imagenet import MiniImageNet
from fewshot.data.safe_pickle import UnsafePickleError

PER_CLASS = 4


@pytest.fixture(autouse=True)
def _small_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fakes have the real number of classes but 4 images each instead of 600.
    monkeypatch.setattr(MiniImageNet, "images_per_class", PER_CLASS)


@pytest.mark.skipif(not (SPLITS_DIR / "mini_imagenet").is_dir(), reason="no shared split CSVs")
def test_fakes_use_the_real_ravi_class_names():
    classes = ravi_classes()
    assert {s: len(c) for s, c in classes.items()} == SPLIT_SIZES
    assert "n01532829" in classes["train"]  # the first row of the real train.csv


def test_tarball_is_extracted_once_and_decoded(tmp_path):
    root = tmp_path / "mini"
    archive = write_mini_imagenet_tarball(root / "mini_imagenet_full_size.tar.gz")
    train = MiniImageNet(root, "train", image_size=16, cache_dir=tmp_path / "c")
    assert (root / "mini_imagenet_full_size" / "train").is_dir()
    assert train.classes == sorted(ravi_classes()["train"]) and train.channels == 3
    assert train.class_sizes == [PER_CLASS] * 64 and len(train) == 64 * PER_CLASS
    name = train.classes[5]
    jpg = root / "mini_imagenet_full_size" / "train" / name / f"{name}{2:08d}.jpg"
    with Image.open(jpg) as img:
        want = np.asarray(img.convert("RGB").resize((16, 16), Image.LANCZOS), dtype=np.float32)
    torch.testing.assert_close(train.load_class_images(5, [2])[0],
                               torch.from_numpy(want / 255).permute(2, 0, 1))
    archive.unlink()  # the extracted folders are enough from now on
    test = MiniImageNet(root, "test", image_size=16, channels=1, cache_dir=tmp_path / "c")
    assert len(test.classes) == 20 and test.load_class_images(0, [0]).shape == (1, 1, 16, 16)


def test_folders_directly_in_root(tmp_path):
    root = write_mini_imagenet_folders(tmp_path / "mini")
    val = MiniImageNet(root, "val", image_size=8, cache_dir=tmp_path / "c")
    assert val.classes == sorted(ravi_classes()["val"])


def test_pickles_follow_class_dict(tmp_path):
    written = write_mini_imagenet_pickles(tmp_path / "mini", splits=("val",))
    val = MiniImageNet(tmp_path / "mini", "val", cache_dir=tmp_path / "c")
    class_dict = written["val"]["class_dict"]
    assert val.classes == sorted(class_dict) and val.class_sizes == [PER_CLASS] * 16
    name = val.classes[3]
    want = written["val"]["image_data"][class_dict[name][1]]
    torch.testing.assert_close(val.load_class_images(3, [1])[0],
                               torch.from_numpy(want).permute(2, 0, 1).float() / 255)
    small = MiniImageNet(tmp_path / "mini", "val", image_size=32, channels=1,
                         cache_dir=tmp_path / "c")
    gray = Image.fromarray(want).convert("L").resize((32, 32), Image.LANCZOS)
    torch.testing.assert_close(small.load_class_images(3, [1])[0, 0],
                               torch.from_numpy(np.asarray(gray, dtype=np.float32) / 255))


def test_hostile_pickle_is_never_executed(tmp_path):
    class Hostile:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    root = tmp_path / "mini"
    root.mkdir()
    (root / "mini-imagenet-cache-test.pkl").write_bytes(
        pickle.dumps({"image_data": Hostile(), "class_dict": {}}))
    with pytest.raises(UnsafePickleError, match="mini-imagenet-cache-test.pkl"):
        MiniImageNet(root, "test", cache_dir=tmp_path / "c")
    assert not (tmp_path / "pwned").exists()


def test_malformed_pickles_are_named(tmp_path):
    root = tmp_path / "mini"
    root.mkdir()
    path = root / "mini-imagenet-cache-test.pkl"
    path.write_bytes(pickle.dumps({"images": np.zeros((1, 84, 84, 3), np.uint8)}))
    with pytest.raises(IntegrityError, match=r"not a mini-ImageNet cache.*'images'"):
        MiniImageNet(root, "test", cache_dir=tmp_path / "c")
    path.write_bytes(pickle.dumps({"image_data": np.zeros((2, 84, 84, 3), np.uint8),
                                   "class_dict": {"a": [0, 1]}}))
    with pytest.raises(IntegrityError, match=r"expected 20 class folders with 4 images each, "
                                             r"found 1 class folders; classes with other counts: a \(2\)"):
        MiniImageNet(root, "test", cache_dir=tmp_path / "c")


def test_incomplete_copy_is_reported_with_counts(tmp_path):
    root = write_mini_imagenet_folders(tmp_path / "mini")
    name = ravi_classes()["train"][7]
    (root / "train" / name / f"{name}{0:08d}.jpg").unlink()
    with pytest.raises(IntegrityError, match=rf"expected 64 class folders .* {name} \(3\)"):
        MiniImageNet(root, "train", cache_dir=tmp_path / "c")


def test_class_in_two_splits_is_refused(tmp_path):
    root = write_mini_imagenet_folders(tmp_path / "mini")
    name = ravi_classes()["test"][0]
    os.rename(root / "test" / name, root / "val" / name)
    (root / "test" / name).mkdir()
    (root / "test" / name / "x.jpg").write_bytes((root / "val" / name / f"{name}{0:08d}.jpg")
                                                 .read_bytes())
    with pytest.raises(IntegrityError, match=rf"'{name}' in 'val' \(4 images\) and 'test' "
                                             r"\(1 images\)"):
        MiniImageNet(root, "train", cache_dir=tmp_path / "c")


def test_missing_data_says_where_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="no official download. download=True .* "
                                                   "fetches .*mirror.*HowToTrainYourMAML"):
        MiniImageNet(tmp_path / "nothing", "train")
    with pytest.raises(ValueError, match="class_split must be None or 'ravi'"):
        MiniImageNet(tmp_path, "train", class_split="maml")


def test_unsafe_archive_is_not_extracted(tmp_path):
    import tarfile

    root = tmp_path / "mini"
    root.mkdir()
    with tarfile.open(root / "mini.tar", "w") as tar:
        info = tarfile.TarInfo("../escape.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(ValueError, match="escapes the destination"):
        MiniImageNet(root, "train", cache_dir=tmp_path / "c")
    assert not (tmp_path / "escape.jpg").exists()


def test_second_load_reads_the_cache_only(tmp_path, monkeypatch):
    root = write_mini_imagenet_folders(tmp_path / "mini")
    first = MiniImageNet(root, "val", image_size=8, cache_dir=tmp_path / "c")
    monkeypatch.setattr(mini_imagenet_module, "decode_class_folders", None)  # calling it fails
    second = MiniImageNet(root, "val", image_size=8, cache_dir=tmp_path / "c")
    torch.testing.assert_close(second.load_class_images(4, [0, 3]),
                               first.load_class_images(4, [0, 3]))
    assert isinstance(second._images, np.memmap)
