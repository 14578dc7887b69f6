"""The user's own image folders: layouts, mixed images, strictness, splits and the cache."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_datasets import image_bytes
from PIL import Image

from fewshot.data import image_folder as image_folder_module
from fewshot.data.download import DatasetNotFoundError, IntegrityError
from fewshot.data.image_decoding import BadImageError
from fewshot.data.image_folder import ImageFolder

FORMATS = [("JPEG", "RGB", ".jpg"), ("PNG", "RGBA", ".png"), ("PNG", "L", ".png"),
           ("BMP", "RGB", ".bmp"), ("GIF", "L", ".gif"), ("WEBP", "RGB", ".webp")]


def write_classes(folder: Path, classes: list[str], per_class: int = 6, seed: int = 0) -> None:
    """Class folders of mixed formats, modes and (non-square) sizes."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            fmt, mode, suffix = FORMATS[i % len(FORMATS)]
            size = (int(rng.integers(10, 40)), int(rng.integers(10, 40)))
            (folder / name / f"img{i}{suffix}").write_bytes(image_bytes(rng, size, mode, fmt))


def split_tree(root: Path, per_class: int = 6) -> Path:
    for split, n in (("train", 5), ("val", 3), ("test", 3)):
        write_classes(root / split, [f"{split}_class{i}" for i in range(n)], per_class)
    return root


def expected_pixels(path: Path, size: int, channels: int) -> torch.Tensor:
    """Independent decode: composite on white, convert, LANCZOS resize, scale to [0, 1]."""
    with Image.open(path) as img:
        if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
            img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA"))
        img = img.convert("L" if channels == 1 else "RGB").resize((size, size), Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255)
    return pixels[None] if channels == 1 else pixels.permute(2, 0, 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_split_folders_decode_mixed_images_like_an_independent_decoder(tmp_path, channels):
    root = split_tree(tmp_path / "data")
    ds = ImageFolder(root, "train", image_size=16, channels=channels, cache_dir=tmp_path / "c")
    assert ds.classes == [f"train_class{i}" for i in range(5)] and ds.class_sizes == [6] * 5
    assert ds.channels == channels and len(ds) == 30
    images = ds.load_class_images(2, range(6))
    assert images.shape == (6, channels, 16, 16) and images.dtype == torch.float32
    files = sorted((root / "train" / "train_class2").iterdir())
    for image, path in zip(images, files, strict=True):
        torch.testing.assert_close(image, expected_pixels(path, 16, channels), atol=1 / 255, rtol=0)
    image, target = ds[13]
    assert target == 2 and torch.equal(image, images[1])


def test_os_junk_and_hidden_files_are_ignored(tmp_path):
    root = split_tree(tmp_path / "data")
    (root / "train" / "train_class0" / ".DS_Store").write_bytes(b"\0junk")
    (root / "train" / "train_class0" / "Thumbs.db").write_bytes(b"junk")
    (root / "train" / ".hidden_class").mkdir()
    (root / "train" / "README.txt").write_text("not a class")
    ds = ImageFolder(root, "train", image_size=8, cache_dir=tmp_path / "c")
    assert len(ds.classes) == 5 and ds.class_sizes[0] == 6


def _spoil(folder: Path) -> dict[str, str]:
    good = (folder / "img0.jpg").read_bytes()
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "notes.txt").write_text("this is not an image")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    return {"empty.jpg": "empty file", "truncated.jpg": "truncated",
            "notes.txt": "not an image", "corrupt.png": ""}


def test_bad_files_are_an_error_naming_every_file_and_why(tmp_path, monkeypatch):
    root = split_tree(tmp_path / "data")
    problems = _spoil(root / "train" / "train_class1")
    with pytest.raises(BadImageError) as error:
        ImageFolder(root, "train", image_size=8, cache_dir=tmp_path / "c")
    message = str(error.value)
    assert message.startswith("4 file(s) in the 'train' split of")
    for name, reason in problems.items():
        line = next(text for text in message.splitlines() if text.strip().startswith(
            str(root / "train" / "train_class1" / name)))
        assert reason in line
    assert "skip_bad_images=True" in message
    # Still an error next time, from the cache, without decoding again.
    monkeypatch.setattr(image_folder_module, "decode_image_files", None)  # calling it fails
    with pytest.raises(BadImageError, match="truncated.jpg"):
        ImageFolder(root, "train", image_size=8, cache_dir=tmp_path / "c")


def test_skipping_bad_files_warns_once_with_the_list(tmp_path):
    root = split_tree(tmp_path / "data")
    _spoil(root / "train" / "train_class1")
    with pytest.warns(UserWarning) as record:
        ds = ImageFolder(root, "train", image_size=8, cache_dir=tmp_path / "c",
                         skip_bad_images=True)
    skipped = [str(w.message) for w in record if "Skipped" in str(w.message)]
    assert len(skipped) == 1 and skipped[0].startswith("Skipped 4 unreadable file(s)")
    for name in ("empty.jpg", "truncated.jpg", "notes.txt", "corrupt.png"):
        assert name in skipped[0]
    assert ds.class_sizes == [6] * 5  # the good files of class 1 are all kept


def test_single_tree_random_split_is_seeded_and_disjoint(tmp_path):
    root = tmp_path / "data"
    write_classes(root, [f"class{i:02d}" for i in range(25)], per_class=2)
    splits = {s: ImageFolder(root, s, image_size=8, cache_dir=tmp_path / "c").classes
              for s in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [16, 4, 5]
    assert sorted(sum(splits.values(), [])) == [f"class{i:02d}" for i in range(25)]
    again = ImageFolder(root, "val", image_size=8, cache_dir=tmp_path / "c").classes
    other = ImageFolder(root, "val", image_size=8, cache_dir=tmp_path / "c", split_seed=1).classes
    assert again == splits["val"] and other != splits["val"]


def test_split_files_choose_the_classes(tmp_path):
    root = tmp_path / "data"
    write_classes(root, ["cat", "dog", "owl", "emu"], per_class=2)
    lists = tmp_path / "split"
    lists.mkdir()
    for split, names in (("train", "cat\ndog\n"), ("val", "# birds\nowl\n"), ("test", "emu\n")):
        (lists / f"{split}.txt").write_text(names)
    assert ImageFolder(root, "val", class_split=str(lists), image_size=8,
                       cache_dir=tmp_path / "c").classes == ["owl"]
    (lists / "test.txt").write_text("emu\ncat\n")
    with pytest.raises(IntegrityError, match=r"'cat' in 'train' \(2 images\) and 'test' \(2 images\)"):
        ImageFolder(root, "val", class_split=str(lists), image_size=8, cache_dir=tmp_path / "c")
    (lists / "test.txt").write_text("yak\n")
    with pytest.raises(ValueError, match="not in .*: yak"):
        ImageFolder(root, "val", class_split=str(lists), image_size=8, cache_dir=tmp_path / "c")


def test_duplicate_class_across_split_folders_is_named_with_counts(tmp_path):
    root = split_tree(tmp_path / "data")
    write_classes(root / "test", ["train_class3"], per_class=4)
    with pytest.raises(IntegrityError, match=r"'train_class3' in 'train' \(6 images\) and "
                                             r"'test' \(4 images\)"):
        ImageFolder(root, "val", image_size=8, cache_dir=tmp_path / "c")


def test_empty_splits_and_empty_classes_are_named(tmp_path):
    root = tmp_path / "data"
    write_classes(root / "train", ["a", "b", "c"], per_class=2)
    (root / "val").mkdir()
    with pytest.raises(DatasetNotFoundError, match=r"'val' split of .* has no class folders"):
        ImageFolder(root, "val", image_size=8, cache_dir=tmp_path / "c")
    with pytest.raises(DatasetNotFoundError, match=r"'test' split of .* has no class folders"):
        ImageFolder(root, "test", image_size=8, cache_dir=tmp_path / "c")
    (root / "train" / "d").mkdir()
    with pytest.raises(IntegrityError, match="classes without images: d"):
        ImageFolder(root, "train", image_size=8, cache_dir=tmp_path / "c")


def test_bad_arguments_are_named(tmp_path):
    root = split_tree(tmp_path / "data", per_class=1)
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        ImageFolder(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="channels must be 1 .* got 4"):
        ImageFolder(root, "train", channels=4)
    with pytest.raises(ValueError, match="cannot be downloaded"):
        ImageFolder(root, "train", download=True)
    with pytest.raises(ValueError, match="already has split folders"):
        ImageFolder(root, "train", class_split="random")
    with pytest.raises(ValueError, match="class_split must be"):
        ImageFolder(tmp_path / "data" / "train", "train", class_split="bogus")


def test_cache_is_reused_keyed_by_settings_and_refreshed_when_files_change(tmp_path, monkeypatch):
    root = split_tree(tmp_path / "data")
    cache = tmp_path / "cache"
    first = ImageFolder(root, "train", image_size=8, cache_dir=cache)
    calls = []
    original = image_folder_module.decode_image_files
    monkeypatch.setattr(image_folder_module, "decode_image_files",
                        lambda *a, **k: calls.append(a) or original(*a, **k))
    second = ImageFolder(root, "train", image_size=8, cache_dir=cache)
    assert calls == []
    torch.testing.assert_close(second.load_class_images(1, [2]), first.load_class_images(1, [2]))
    ImageFolder(root, "train", image_size=12, cache_dir=cache)
    ImageFolder(root, "train", image_size=8, channels=1, cache_dir=cache)
    assert len(calls) == 2
    write_classes(root / "train", ["train_class5"], per_class=3)
    assert len(ImageFolder(root, "train", image_size=8, cache_dir=cache).classes) == 6
    assert len(calls) == 3


def test_partially_written_cache_is_never_used(tmp_path):
    root = split_tree(tmp_path / "data")
    cache = tmp_path / "cache"
    good = ImageFolder(root, "train", image_size=8, cache_dir=cache).load_class_images(0, [0])
    (array,) = (cache / "folder").glob("*.npy")
    array.write_bytes(array.read_bytes()[:-100])  # as if the write had stopped short
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = ImageFolder(root, "train", image_size=8, cache_dir=cache)
    torch.testing.assert_close(again.load_class_images(0, [0]), good)
    (array,) = (cache / "folder").glob("*.npy")
    (meta,) = (cache / "folder").glob("*.json")
    meta.unlink()  # the description is written last: without it, the array is not trusted
    array.write_bytes(b"\x93NUMPY garbage")
    torch.testing.assert_close(
        ImageFolder(root, "train", image_size=8, cache_dir=cache).load_class_images(0, [0]), good)


def test_unwritable_cache_still_works_in_memory(tmp_path):
    root = split_tree(tmp_path / "data", per_class=2)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="Cannot write the image cache"):
        ds = ImageFolder(root, "train", image_size=8, cache_dir=blocker)
    assert ds.load_class_images(0, [1]).shape == (1, 3, 8, 8)


def test_process_pool_decodes_like_the_main_process(tmp_path, monkeypatch):
    from fewshot.data import image_decoding

    root = split_tree(tmp_path / "data", per_class=4)
    _spoil(root / "train" / "train_class3")
    files = sorted((root / "train").rglob("*.*"))
    alone, bad_alone = image_decoding.decode_image_files(files, 10, 3)
    monkeypatch.setattr(image_decoding, "_POOL_MIN_FILES", 1)
    monkeypatch.setattr(image_decoding, "_FILES_PER_TASK", 3)
    monkeypatch.setattr(image_decoding.os, "cpu_count", lambda: 2)
    pooled, bad_pooled = image_decoding.decode_image_files(files, 10, 3)
    np.testing.assert_array_equal(pooled, alone)
    assert bad_pooled == bad_alone and len(bad_alone) == 4 and len(alone) == len(files) - 4


@pytest.mark.parametrize("names", [("Train", "Val", "Test"), ("TRAIN", "valid", "TEST"),
                                   ("train", "Validation", "test")])
def test_split_folders_in_any_case_and_valid_for_val(tmp_path, names):
    for name, split in zip(names, ("train", "val", "test"), strict=True):
        write_classes(tmp_path / name, [f"{split}_class{i}" for i in range(3)], per_class=2)
    for split in ("train", "val", "test"):
        data = ImageFolder(tmp_path, split=split, image_size=8, channels=1,
                           cache_dir=tmp_path / "cache")
        assert data.classes == [f"{split}_class{i}" for i in range(3)]


@pytest.mark.parametrize("pair", [("val", "Val"), ("Val", "validation")])
def test_two_spellings_of_one_split_are_refused_naming_both(tmp_path, pair):
    for name in ("train", "test", *pair):
        write_classes(tmp_path / name, [f"{name}_c"], per_class=1)
    with pytest.raises(ValueError, match=f"2 folders for the 'val' split: .*{pair[0]}/.*{pair[1]}/"
                       f"|2 folders for the 'val' split: .*{pair[1]}/.*{pair[0]}/"):
        ImageFolder(tmp_path, split="train", image_size=8, channels=1, cache_dir=tmp_path / "c")
