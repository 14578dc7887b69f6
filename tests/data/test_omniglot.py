"""Omniglot: sources, class splits, integrity checks, the shared cache and decoder."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import stat
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.data import image_decoding
from fewshot.data import omniglot as omniglot_module
from fewshot.data.download import DatasetNotFoundError, IntegrityError
from fewshot.data.image_decoding import BadImageError
from fewshot.data.omniglot import Omniglot
from fewshot.data.split_cache import StoredSplit, save_split

BACKGROUND = [f"Background_Script_{a}/character{c:02d}" for a in range(2) for c in (1, 2, 3)]
EVALUATION = [f"Evaluation_Script_0/character{c:02d}" for c in (1, 2, 3)]


def _expected(root: Path, character: str, image: int, size: int = 28) -> torch.Tensor:
    """Independent decode of one fake PNG, as the dataset promises to return it."""
    part = "images_background" if character.startswith("Background") else "images_evaluation"
    with zipfile.ZipFile(root / f"{part}.zip") as zf:
        names = sorted(n for n in zf.namelist() if n.startswith(f"{part}/{character}/") and
                       n.endswith(".png"))
        img = Image.open(io.BytesIO(zf.read(names[image]))).convert("L")
    pixels = 255 - np.asarray(img.resize((size, size), Image.LANCZOS), dtype=np.float32)
    return torch.from_numpy(pixels / 255.0)[None]


def _old_decode_png(data: bytes, size: int) -> np.ndarray:
    """Omniglot's own decoder before it moved onto the shared one, kept as the reference."""
    with Image.open(io.BytesIO(data)) as img:
        gray = img.convert("L")
    if gray.size != (size, size):
        gray = gray.resize((size, size), Image.LANCZOS)
    # MAML's convention: strokes are bright on a dark background.
    return 255 - np.asarray(gray, dtype=np.uint8)


def _pixels(ds: Omniglot, class_id: int) -> np.ndarray:
    """uint8 [k, 1, S, S] of one class, back from the [0, 1] floats the dataset serves."""
    images = ds.load_class_images(class_id, range(ds.class_sizes[class_id]))
    return (images * 255).round().to(torch.uint8).numpy()


def _member_bytes(root: Path, character: str) -> list[bytes]:
    """The PNG files of one character, sorted by name, from the zips or extracted folders."""
    part = "images_background" if character.startswith("Background") else "images_evaluation"
    if (root / f"{part}.zip").is_file():
        with zipfile.ZipFile(root / f"{part}.zip") as zf:
            names = sorted(n for n in zf.namelist()
                           if n.startswith(f"{part}/{character}/") and n.endswith(".png"))
            return [zf.read(n) for n in names]
    return [p.read_bytes() for p in sorted((root / part / character).glob("*.png"))]


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("images were decoded although a valid cache exists")

    monkeypatch.setattr(omniglot_module, "decode_class_folders", fail)


def _count_decoding(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = omniglot_module.decode_class_folders
    monkeypatch.setattr(omniglot_module, "decode_class_folders",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_lake_train_matches_independent_decode(fake_root: Path, tmp_path: Path) -> None:
    ds = Omniglot(fake_root, split="train", class_split="lake", rotations=False,
                  cache_dir=tmp_path / "cache")
    assert ds.classes == BACKGROUND and ds.class_sizes == [20] * 6 and len(ds) == 120
    assert ds.channels == 1
    images = ds.load_class_images(4, [0, 7])
    assert images.shape == (2, 1, 28, 28) and images.dtype == torch.float32
    torch.testing.assert_close(images[1], _expected(fake_root, BACKGROUND[4], 7))
    test = Omniglot(fake_root, split="test", class_split="lake", cache_dir=tmp_path / "cache")
    assert test.classes == EVALUATION and not test.rotations
    with pytest.raises(ValueError, match="no validation set"):
        Omniglot(fake_root, split="val", class_split="lake", cache_dir=tmp_path / "cache")


def test_getitem_is_class_major_and_applies_transforms(fake_root: Path) -> None:
    ds = Omniglot(fake_root, split="test", class_split="lake", image_size=14,
                  transform=lambda x: x * 2, target_transform=lambda y: y + 100)
    image, target = ds[45]  # class 2, image 5
    assert target == 102 and image.shape == (1, 14, 14)
    torch.testing.assert_close(image, 2 * _expected(fake_root, EVALUATION[2], 5, size=14))
    torch.testing.assert_close(ds[-1][0], ds[59][0])
    with pytest.raises(IndexError):
        ds[60]
    with pytest.raises(IndexError):
        ds.load_class_images(3, [0])


@pytest.mark.parametrize("as_zip", [True, False])
@pytest.mark.parametrize("size", [28, 20, 105])
def test_decoded_pixels_are_those_of_the_old_decoder(tmp_path: Path, fake_counts,
                                                    fake_omniglot_maker, as_zip: bool,
                                                    size: int) -> None:
    root = tmp_path / "omniglot"
    fake_omniglot_maker(root, as_zip=as_zip)
    ds = Omniglot(root, class_split="lake", split="train", image_size=size, rotations=False)
    test = Omniglot(root, class_split="lake", split="test", image_size=size)
    for data in (ds, test):
        for class_id, character in enumerate(data.characters):
            expected = np.stack([_old_decode_png(png, size)[None]
                                 for png in _member_bytes(root, character)])
            np.testing.assert_array_equal(_pixels(data, class_id), expected)


def test_extracted_folders_give_the_same_images(tmp_path: Path, fake_counts,
                                                 fake_omniglot_maker) -> None:
    fake_omniglot_maker(tmp_path / "zips", as_zip=True)
    fake_omniglot_maker(tmp_path / "dirs", as_zip=False)
    from_zip = Omniglot(tmp_path / "zips", class_split="lake", rotations=False)
    from_dirs = Omniglot(tmp_path / "dirs", class_split="lake", rotations=False)
    assert from_zip.classes == from_dirs.classes
    assert torch.equal(from_zip.load_class_images(5, range(20)),
                       from_dirs.load_class_images(5, range(20)))


def test_rotations_make_four_classes_per_character(fake_root: Path) -> None:
    ds = Omniglot(fake_root, split="train", class_split="lake")
    assert ds.rotations and len(ds.classes) == 24 and len(ds) == 24 * 20
    assert ds.classes[4:8] == [BACKGROUND[1] + s for s in ("", "/rot90", "/rot180", "/rot270")]
    base = ds.load_class_images(4, [3, 0])
    assert not torch.equal(base, torch.rot90(base, 1, dims=(-2, -1)))  # fake is not symmetric
    for k in range(1, 4):
        torch.testing.assert_close(ds.load_class_images(4 + k, torch.tensor([3, 0])),
                                   torch.rot90(base, k, dims=(-2, -1)))
    assert not Omniglot(fake_root, split="train", class_split="lake", rotations=False).rotations


def test_maml_split_is_a_seeded_partition(fake_root: Path) -> None:
    def characters(split: str, seed: int = 0) -> list[str]:
        return Omniglot(fake_root, split=split, split_seed=seed, rotations=False).characters

    splits = {s: characters(s) for s in ("train", "val", "test")}
    assert [len(v) for v in splits.values()] == [5, 2, 2]
    assert sorted(sum(splits.values(), [])) == sorted(BACKGROUND + EVALUATION)
    assert characters("val") == splits["val"]
    assert any(characters(s, seed=1) != splits[s] for s in splits)


def test_maml_sizes_must_match_the_data(fake_root: Path, monkeypatch) -> None:
    monkeypatch.setattr(Omniglot, "maml_split_sizes", (1100, 100, 423))
    with pytest.raises(ValueError, match="do not add up to 9"):
        Omniglot(fake_root)


def test_split_files(fake_root: Path, tmp_path: Path) -> None:
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train.txt").write_text(f"{BACKGROUND[3]}\n\n{EVALUATION[0]}\n")
    (splits / "test.txt").write_text(f"{BACKGROUND[0]}\nNope/character07\n")
    train = Omniglot(fake_root, split="train", class_split=splits)
    assert train.classes[::4] == [BACKGROUND[3], EVALUATION[0]] and len(train.classes) == 8
    with pytest.raises(ValueError) as info:
        Omniglot(fake_root, split="test", class_split=str(splits))
    assert f"{splits / 'test.txt'}:2" in str(info.value) and "Nope/character07" in str(info.value)
    with pytest.raises(FileNotFoundError, match="val.txt"):
        Omniglot(fake_root, split="val", class_split=splits)
    with pytest.raises(ValueError, match="'maml', 'lake' or a directory"):
        Omniglot(fake_root, class_split="vinyals")


def test_bad_split_name(fake_root: Path) -> None:
    with pytest.raises(ValueError, match="'training'"):
        Omniglot(fake_root, split="training")


def test_structure_check_names_archive_and_counts(tmp_path: Path, fake_omniglot_maker) -> None:
    root = tmp_path / "small"
    fake_omniglot_maker(root)  # 6 + 3 characters, checked against the official 964 / 659
    with pytest.raises(IntegrityError) as info:
        Omniglot(root)
    message = str(info.value)
    assert str(root / "images_background.zip") in message
    assert "expected 964 character folders" in message and "found 6" in message


def test_structure_check_catches_missing_images(tmp_path: Path, fake_counts,
                                                 fake_omniglot_maker) -> None:
    fake_omniglot_maker(tmp_path / "short", images_per_character=19, as_zip=False)
    with pytest.raises(IntegrityError, match=r"character01 \(19\)"):
        Omniglot(tmp_path / "short")


def test_missing_data_without_download(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as info:
        Omniglot(tmp_path)
    message = str(info.value)
    assert f"Omniglot not found in {tmp_path}" in message and "download=True" in message
    assert str(tmp_path / "images_evaluation.zip") in message


def test_download_offline_names_url(tmp_path: Path, monkeypatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetNotFoundError) as info:
        Omniglot(tmp_path / "root", download=True)
    assert Omniglot.urls["images_background"] in str(info.value)
    assert "offline" in str(info.value)


def test_download_fetches_missing_archives_once(tmp_path: Path, fake_counts, monkeypatch,
                                                fake_omniglot_maker) -> None:
    server = tmp_path / "server"
    fake_omniglot_maker(server)
    monkeypatch.setattr(Omniglot, "urls", {p: (server / f"{p}.zip").as_uri() for p in fake_counts})
    monkeypatch.setattr(Omniglot, "md5s", {
        p: hashlib.md5((server / f"{p}.zip").read_bytes()).hexdigest() for p in fake_counts})
    root = tmp_path / "root"
    ds = Omniglot(root, download=True, class_split="lake", split="test")
    assert ds.classes == EVALUATION
    assert sorted(p.name for p in root.iterdir()) == ["images_background.zip",
                                                      "images_evaluation.zip"]
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    Omniglot(root, download=True, class_split="lake", split="test")


def _no_network(*args, **kwargs):
    raise AssertionError("no download expected")


def test_read_only_root_with_unofficial_zips(fake_root: Path, tmp_path: Path,
                                             monkeypatch) -> None:
    before = sorted(fake_root.rglob("*"))
    for path in [fake_root, *before]:
        path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)  # md5 differs: still no fetch
    try:
        ds = Omniglot(fake_root, download=True, cache_dir=tmp_path / "cache")
    finally:
        for path in [fake_root, *before]:
            path.chmod(0o755)
    assert len(ds.classes) == 20
    assert sorted(fake_root.rglob("*")) == before
    assert len(list((tmp_path / "cache" / "omniglot").glob("*.npy"))) == 1


def test_cache_is_reused_and_keyed_by_size(fake_root: Path, tmp_path: Path,
                                           monkeypatch) -> None:
    first = Omniglot(fake_root, class_split="lake", cache_dir=tmp_path / "c")
    _forbid_decoding(monkeypatch)
    again = Omniglot(fake_root, class_split="lake", cache_dir=tmp_path / "c")
    assert again.classes == first.classes
    assert torch.equal(again.load_class_images(9, range(20)), first.load_class_images(9, range(20)))
    with pytest.raises(AssertionError, match="decoded although"):
        Omniglot(fake_root, class_split="lake", image_size=20, cache_dir=tmp_path / "c")


def test_default_cache_dir_comes_from_environment(fake_root: Path, tmp_path: Path,
                                                  monkeypatch) -> None:
    monkeypatch.setenv("FEWSHOT_CACHE_DIR", str(tmp_path / "env-cache"))
    Omniglot(fake_root)
    cached = list((tmp_path / "env-cache" / "omniglot").glob("omniglot-all-28px-1ch-*.npy"))
    assert len(cached) == 1


def test_all_splits_share_one_cache(fake_root: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "c"
    Omniglot(fake_root, cache_dir=cache)
    _forbid_decoding(monkeypatch)
    for split in ("train", "val", "test"):
        Omniglot(fake_root, split=split, cache_dir=cache, split_seed=3)
    Omniglot(fake_root, split="test", class_split="lake", cache_dir=cache)
    assert len(list((cache / "omniglot").glob("*.npy"))) == 1


def test_truncated_cache_is_rebuilt(fake_root: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "c"
    good = Omniglot(fake_root, class_split="lake", cache_dir=cache).load_class_images(3, [1, 2])
    (path,) = (cache / "omniglot").glob("*.npy")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    calls = _count_decoding(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Ignoring unreadable cache", if mmap gets that far
        again = Omniglot(fake_root, class_split="lake", cache_dir=cache)
    assert calls == [1]
    assert torch.equal(again.load_class_images(3, [1, 2]), good)
    _forbid_decoding(monkeypatch)  # the rewritten cache is complete again
    Omniglot(fake_root, class_split="lake", cache_dir=cache)
    assert sorted(p.name for p in (cache / "omniglot").iterdir()) == sorted(
        [path.name, path.with_suffix(".json").name])


def test_process_pool_decodes_zip_members_like_the_main_process(fake_root: Path, tmp_path: Path,
                                                                monkeypatch) -> None:
    serial = Omniglot(fake_root, cache_dir=tmp_path / "serial", rotations=False)
    monkeypatch.setattr(image_decoding, "_POOL_MIN_FILES", 1)
    monkeypatch.setattr(image_decoding, "_FILES_PER_TASK", 7)
    monkeypatch.setattr(image_decoding.os, "cpu_count", lambda: 2)
    pooled = Omniglot(fake_root, cache_dir=tmp_path / "pooled", rotations=False)
    for class_id in range(len(serial.classes)):
        np.testing.assert_array_equal(_pixels(pooled, class_id), _pixels(serial, class_id))
    assert not image_decoding._open_zips  # the parent keeps no archive open


def test_cache_with_other_characters_is_not_used(fake_root: Path, tmp_path: Path) -> None:
    cache = tmp_path / "c"
    first = Omniglot(fake_root, class_split="lake", cache_dir=cache)
    good = first.load_class_images(0, [0])
    (path,) = (cache / "omniglot").glob("*.npy")
    # E.g. a fingerprint collision: right shape, wrong content.
    fake = StoredSplit(np.zeros((9 * 20, 1, 28, 28), dtype=np.uint8),
                       [f"Other/character{i:02d}" for i in range(9)], [20] * 9)
    save_split(path.parent, path.stem, fake)
    again = Omniglot(fake_root, class_split="lake", cache_dir=cache)
    assert torch.equal(again.load_class_images(0, [0]), good)


def _spoil_member(archive: Path, member_index: int, data: bytes) -> str:
    """Rewrite ``archive`` with its ``member_index``-th PNG replaced by ``data``."""
    with zipfile.ZipFile(archive) as zf:
        entries = [(info.filename, zf.read(info)) for info in zf.infolist()]
    name = sorted(n for n, _ in entries if n.endswith(".png"))[member_index]
    with zipfile.ZipFile(archive, "w") as zf:
        for entry, content in entries:
            zf.writestr(entry, data if entry == name else content)
    return name


def test_unreadable_pngs_in_an_archive_are_named(fake_root: Path, tmp_path: Path,
                                                 monkeypatch) -> None:
    archive = fake_root / "images_evaluation.zip"
    png = _member_bytes(fake_root, EVALUATION[1])[5]
    truncated = _spoil_member(archive, 25, png[:len(png) // 2])
    empty = _spoil_member(archive, 3, b"")
    with pytest.raises(BadImageError) as info:
        Omniglot(fake_root, cache_dir=tmp_path / "c")
    message = str(info.value)
    assert message.startswith("2 file(s) in Omniglot in")
    assert f"{archive}:{truncated}: corrupt or truncated" in message
    assert f"{archive}:{empty}: empty file" in message
    # Still an error from the cache, without decoding again; or left out if asked.
    _forbid_decoding(monkeypatch)
    with pytest.raises(BadImageError, match="skip_bad_images=True"):
        Omniglot(fake_root, split="test", cache_dir=tmp_path / "c")
    with pytest.warns(UserWarning, match="Skipped 2 unreadable file"):
        test = Omniglot(fake_root, split="test", class_split="lake", cache_dir=tmp_path / "c",
                        skip_bad_images=True)
    assert test.class_sizes == [19, 19, 20]


def test_corrupt_archive_is_named(fake_root: Path) -> None:
    archive = fake_root / "images_background.zip"
    archive.write_bytes(archive.read_bytes()[:1000])
    with pytest.raises(IntegrityError, match=f"{archive} is not a readable zip archive"):
        Omniglot(fake_root)


def test_grayscale_only_and_none_is_the_maml_split(fake_root: Path) -> None:
    with pytest.raises(ValueError, match="Omniglot images have 1 channel, got channels=3"):
        Omniglot(fake_root, channels=3)
    assert Omniglot(fake_root, class_split=None).characters == Omniglot(fake_root).characters


def test_pickles_the_cache_path_not_the_pixels(fake_root: Path) -> None:
    ds = Omniglot(fake_root, split="train")
    payload = pickle.dumps(ds)
    assert len(payload) < 9 * 20 * 28 * 28 / 4
    copy = pickle.loads(payload)
    assert copy.classes == ds.classes and copy.rotations
    for class_id in (0, 5, 19):
        assert torch.equal(copy.load_class_images(class_id, [2, 0]),
                           ds.load_class_images(class_id, [2, 0]))


REPO = Path(__file__).resolve().parents[2]
REAL_ROOT = Path(os.environ.get("FEWSHOT_OMNIGLOT_ROOT", REPO.parent / "shared/data/omniglot"))
VINYALS = REPO.parent / "shared/data/splits/omniglot"


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Decode the real archives once per session; every later construction hits this cache."""
    if not (REAL_ROOT / "images_background.zip").is_file() and \
            not (REAL_ROOT / "images_background").is_dir():
        pytest.skip(f"real Omniglot not found in {REAL_ROOT}")
    cache = tmp_path_factory.mktemp("omniglot-real-cache")
    Omniglot(REAL_ROOT, cache_dir=cache)
    return cache


@pytest.mark.real_data
def test_real_omniglot(real_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _forbid_decoding(monkeypatch)

    def load(split: str, class_split: str | Path = "maml") -> Omniglot:
        return Omniglot(REAL_ROOT, split=split, class_split=class_split, cache_dir=real_cache)

    maml = {s: load(s) for s in ("train", "val", "test")}
    assert [len(d.classes) for d in maml.values()] == [1100 * 4, 100, 423]
    assert len({c for d in maml.values() for c in d.characters}) == 1623
    lake = {s: load(s, "lake") for s in ("train", "test")}
    assert [len(d.characters) for d in lake.values()] == [964, 659]
    for ds in [*maml.values(), *lake.values()]:
        assert set(ds.class_sizes) == {20} and len(ds) == 20 * len(ds.classes)
    image, target = maml["test"][20 * 7 + 3]
    assert target == 7 and image.shape == (1, 28, 28) and image.dtype == torch.float32
    batch = maml["train"].load_class_images(4 * 11 + 1, range(20))
    assert batch.shape == (20, 1, 28, 28)
    assert batch.min() == 0 and batch.max() == 1 and batch.mean() < 0.3  # dark background
    # The shared decoder gives the pixels Omniglot's own decoder gave, on real scans too.
    test = maml["test"]
    archives = {part: zipfile.ZipFile(REAL_ROOT / f"{part}.zip")
                for part in ("images_background", "images_evaluation")}
    with archives["images_background"], archives["images_evaluation"]:
        members = {n: zf for zf in archives.values() for n in zf.namelist()}
        for class_id in (0, 200, 422):
            character = test.characters[class_id]
            names = sorted(n for n in members if f"/{character}/" in n and n.endswith(".png"))
            expected = np.stack([_old_decode_png(members[n].read(n), 28)[None] for n in names])
            np.testing.assert_array_equal(_pixels(test, class_id), expected)
    if VINYALS.is_dir():
        vinyals = {s: load(s, VINYALS) for s in ("train", "val", "test")}
        assert [len(d.characters) for d in vinyals.values()] == [1028, 172, 423]
        assert [len(d.classes) for d in vinyals.values()] == [1028 * 4, 172, 423]
