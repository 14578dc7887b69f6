"""Downloads from the mirror (Zenodo record 7978538), served by a real HTTP server on
127.0.0.1: complete, resumed after a cut connection, a server error, offline, a changed file."""

from __future__ import annotations

import json
import socket

import pytest
from fake_datasets import write_mini_imagenet_pickles
from http_server import serve

from fewshot.data.download import (
    MANIFEST_NAME,
    DatasetNotFoundError,
    IntegrityError,
    check_download,
    download_resumable,
    sha256sum,
)
from fewshot.data.mini_imagenet import MiniImageNet
from fewshot.data.mirror import MIRROR_ENV, MIRROR_URL, mirror_url

PER_CLASS = 4


@pytest.fixture
def mini_imagenet_files(tmp_path, monkeypatch) -> dict[str, bytes]:
    """The three pickles, format-exact (4 images per class), under the mirror's names."""
    monkeypatch.setattr(MiniImageNet, "images_per_class", PER_CLASS)
    source = tmp_path / "source"
    write_mini_imagenet_pickles(source, PER_CLASS)
    return {MiniImageNet.mirror_files[split]: (source / f"mini-imagenet-cache-{split}.pkl").read_bytes()
            for split in ("train", "val", "test")}


def test_the_mirror_is_zenodo_unless_overridden(monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    assert mirror_url("fc100.zip") == "https://zenodo.org/record/7978538/files/fc100.zip"
    assert MIRROR_URL.startswith("https://")
    monkeypatch.setenv(MIRROR_ENV, "http://mirror.example/few/")
    assert mirror_url("fc100.zip") == "http://mirror.example/few/fc100.zip"


def test_mini_imagenet_download_complete(tmp_path, monkeypatch, mini_imagenet_files):
    root = tmp_path / "mini"
    with serve(mini_imagenet_files) as server:
        monkeypatch.setenv(MIRROR_ENV, server.base)
        val = MiniImageNet(root, "val", download=True, cache_dir=tmp_path / "cache")
        assert len(val.classes) == 16 and val.class_sizes == [PER_CLASS] * 16
        assert sorted(name for name, _ in server.requests) == sorted(mini_imagenet_files)
        # Every split reads its downloaded pickle (the validation one by the mirror's name).
        for split in ("train", "test"):
            MiniImageNet(root, split, download=True, cache_dir=tmp_path / "cache")
        assert len(server.requests) == 3  # nothing is fetched twice
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    for name, data in mini_imagenet_files.items():
        assert (root / name).read_bytes() == data
        assert manifest[name]["sha256"] == sha256sum(root / name)
        assert manifest[name]["url"] == f"{server.base}/{name}"
    assert not list(root.glob("*.part"))


def test_resume_after_a_cut_connection(tmp_path, monkeypatch, mini_imagenet_files):
    root = tmp_path / "mini"
    name = "mini-imagenet-cache-train.pkl"
    data = mini_imagenet_files[name]
    with serve(mini_imagenet_files) as server:
        monkeypatch.setenv(MIRROR_ENV, server.base)
        server.cut_after[name] = len(data) // 3
        with pytest.raises(DatasetNotFoundError, match=f"Download of {server.base}/{name} "
                                                       "(failed|stopped after .* is kept)"):
            MiniImageNet(root, "train", download=True, cache_dir=tmp_path / "cache")
        part = root / (name + ".part")
        assert part.stat().st_size == len(data) // 3 and not (root / name).exists()
        MiniImageNet(root, "train", download=True, cache_dir=tmp_path / "cache")
        # The second request asked only for the rest.
        assert [r for r in server.requests if r[0] == name] == [
            (name, None), (name, f"bytes={len(data) // 3}-")]
    assert (root / name).read_bytes() == data and not part.exists()


def test_a_server_that_cannot_resume_starts_over(tmp_path, mini_imagenet_files):
    name = "mini-imagenet-cache-test.pkl"
    (tmp_path / (name + ".part")).write_bytes(b"stale bytes of an older attempt")
    with serve(mini_imagenet_files) as server:
        server.ignore_range = True
        download_resumable(f"{server.base}/{name}", tmp_path / name)
    assert (tmp_path / name).read_bytes() == mini_imagenet_files[name]


def test_a_server_error_is_named_and_leaves_nothing(tmp_path, monkeypatch, mini_imagenet_files):
    root = tmp_path / "mini"
    with serve(mini_imagenet_files) as server:
        monkeypatch.setenv(MIRROR_ENV, server.base)
        server.status["mini-imagenet-cache-train.pkl"] = 503
        with pytest.raises(DatasetNotFoundError, match="mini-imagenet-cache-train.pkl failed: "
                                                       "HTTP Error 503"):
            MiniImageNet(root, "train", download=True, cache_dir=tmp_path / "cache")
    assert not (root / "mini-imagenet-cache-train.pkl").exists()
    assert not list(root.glob("*.part"))


def test_offline_is_one_clear_error(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{port}/files")
    with pytest.raises(DatasetNotFoundError, match="You may be offline.*place the file at"):
        MiniImageNet(tmp_path / "mini", "train", download=True, cache_dir=tmp_path / "cache")


def test_a_changed_file_is_named_as_changed(tmp_path, monkeypatch, mini_imagenet_files):
    root = tmp_path / "mini"
    with serve(mini_imagenet_files) as server:
        monkeypatch.setenv(MIRROR_ENV, server.base)
        MiniImageNet(root, "test", download=True, cache_dir=tmp_path / "cache")
    path = root / "mini-imagenet-cache-test.pkl"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="mini-imagenet-cache-test.pkl has changed since it "
                                             "was downloaded"):
        MiniImageNet(root, "test", cache_dir=tmp_path / "cache")


def test_a_touched_but_unchanged_file_passes_and_is_remembered(tmp_path, mini_imagenet_files):
    name = "mini-imagenet-cache-test.pkl"
    with serve(mini_imagenet_files) as server:
        path = download_resumable(f"{server.base}/{name}", tmp_path / name)
    path.write_bytes(path.read_bytes())  # new timestamp, same bytes
    check_download(path)
    entry = json.loads((tmp_path / MANIFEST_NAME).read_text())[name]
    assert entry["mtime_ns"] == path.stat().st_mtime_ns
