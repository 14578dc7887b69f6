from __future__ import annotations

import hashlib
import io
import tarfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from fewshot.data import download
from fewshot.data.download import (
    DatasetNotFoundError,
    IntegrityError,
    UnsafeArchiveError,
    download_url,
    extract_archive,
    md5sum,
)

PAYLOAD = b"omniglot" * 5000


def _tree(path: Path) -> set[str]:
    return {p.relative_to(path).as_posix() for p in path.rglob("*")}


@pytest.fixture
def remote(tmp_path: Path) -> tuple[str, str]:
    source = tmp_path / "server" / "file.bin"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    return source.as_uri(), hashlib.md5(PAYLOAD).hexdigest()


def _offline(monkeypatch: pytest.MonkeyPatch, exc: Exception | None = None) -> None:
    def fail(*args, **kwargs):
        raise exc or urllib.error.URLError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", fail)


def test_md5sum_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(PAYLOAD)
    assert md5sum(path, chunk_size=7) == hashlib.md5(PAYLOAD).hexdigest()


def test_download_writes_file_and_leaves_no_part(tmp_path: Path, remote) -> None:
    url, md5 = remote
    dest = tmp_path / "out" / "file.zip"
    assert download_url(url, dest, md5) == dest
    assert dest.read_bytes() == PAYLOAD
    assert _tree(dest.parent) == {"file.zip"}


@pytest.mark.parametrize("with_md5", [True, False])
def test_download_is_idempotent(tmp_path: Path, remote, monkeypatch, with_md5: bool) -> None:
    url, md5 = remote
    dest = tmp_path / "file.zip"
    download_url(url, dest, md5 if with_md5 else None)
    _offline(monkeypatch)  # a second download attempt would now fail loudly
    assert download_url(url, dest, md5 if with_md5 else None) == dest
    assert dest.read_bytes() == PAYLOAD


def test_existing_file_with_wrong_md5_is_fetched_again(tmp_path: Path, remote) -> None:
    url, md5 = remote
    dest = tmp_path / "file.zip"
    dest.write_bytes(b"corrupt")
    (tmp_path / "file.zip.part").write_bytes(b"stale partial download")
    download_url(url, dest, md5)
    assert dest.read_bytes() == PAYLOAD
    assert not (tmp_path / "file.zip.part").exists()


def test_md5_mismatch_deletes_file_and_names_hashes(tmp_path: Path, remote) -> None:
    url, md5 = remote
    dest = tmp_path / "file.zip"
    dest.write_bytes(b"old and wrong")
    wrong = "0" * 32
    with pytest.raises(IntegrityError) as info:
        download_url(url, dest, wrong)
    message = str(info.value)
    assert str(dest) in message and wrong in message and md5 in message
    assert _tree(tmp_path) == {"server", "server/file.bin"}


@pytest.mark.parametrize("exc", [urllib.error.URLError("Name or service not known"),
                                 TimeoutError("timed out"), ConnectionResetError("reset")])
def test_network_failure_says_offline(tmp_path: Path, monkeypatch, exc: Exception) -> None:
    _offline(monkeypatch, exc)
    url = "https://example.invalid/images_background.zip"
    dest = tmp_path / "images_background.zip"
    with pytest.raises(DatasetNotFoundError) as info:
        download_url(url, dest, "abc")
    message = str(info.value)
    assert url in message and "offline" in message and str(dest) in message
    assert not any(tmp_path.iterdir())


def test_failure_mid_stream_leaves_nothing(tmp_path: Path, monkeypatch) -> None:
    class Flaky(io.BytesIO):
        headers = {"Content-Length": "100"}
        reads = 0

        def read(self, n: int = -1) -> bytes:
            self.reads += 1
            if self.reads > 1:
                raise TimeoutError("read timed out")
            return b"x" * 10

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: Flaky())
    with pytest.raises(DatasetNotFoundError, match="offline"):
        download_url("https://example.invalid/f.zip", tmp_path / "f.zip")
    assert not any(tmp_path.iterdir())


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=zipfile.ZIP_DEFLATED)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info in members:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def _tarinfo(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


GOOD = {"top/": b"", "top/a.txt": b"alpha", "top/sub/b.txt": b"beta" * 100}


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_extract_good_archive(tmp_path: Path, kind: str) -> None:
    if kind == "zip":
        archive = _zip(tmp_path / "a.zip", GOOD)
    else:
        infos = [_tarinfo("top", tarfile.DIRTYPE), _tarinfo("top/a.txt"), _tarinfo("top/sub/b.txt")]
        archive = _tar(tmp_path / "a.tar.gz", infos, {k: v for k, v in GOOD.items() if v})
    dest = tmp_path / "out"
    extract_archive(archive, dest)
    assert (dest / "top/a.txt").read_bytes() == b"alpha"
    assert (dest / "top/sub/b.txt").read_bytes() == b"beta" * 100
    assert _tree(tmp_path) == {archive.name, "out", "out/top", "out/top/a.txt", "out/top/sub",
                               "out/top/sub/b.txt"}


def test_extract_into_existing_folder_replaces_entry_and_keeps_others(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", GOOD)
    dest = tmp_path / "out"
    (dest / "top").mkdir(parents=True)
    (dest / "top/old.txt").write_text("old")
    (dest / "unrelated.txt").write_text("keep me")
    extract_archive(archive, dest)
    assert _tree(dest) == {"top", "top/a.txt", "top/sub", "top/sub/b.txt", "unrelated.txt"}


def test_interrupted_extraction_leaves_no_destination(tmp_path: Path, monkeypatch) -> None:
    archive = _zip(tmp_path / "a.zip", GOOD)
    real_copy, calls = download._copy_limited, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(download, "_copy_limited", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_archive(archive, tmp_path / "out")
    assert _tree(tmp_path) == {"a.zip"}


def _unsafe_cases(tmp_path: Path) -> dict[str, tuple[Path, str, int]]:
    absolute = str(tmp_path / "escaped.txt")
    big = b"\0" * 200_000  # deflates to a few hundred bytes: a small-scale zip bomb
    return {
        "zip-traversal": (_zip(tmp_path / "t.zip", {"ok.txt": b"1", "../escaped.txt": b"x"}),
                          "../escaped.txt", 2**20),
        "zip-absolute": (_zip(tmp_path / "a.zip", {absolute: b"x"}), absolute, 2**20),
        "zip-symlink": (_zip_symlink(tmp_path / "s.zip"), "link", 2**20),
        "zip-bomb": (_zip(tmp_path / "b.zip", {"a": big, "bomb": big}), "bomb", 300_000),
        "tar-traversal": (_tar(tmp_path / "t.tgz", [_tarinfo("d/../../escaped.txt")],
                               {"d/../../escaped.txt": b"x"}), "d/../../escaped.txt", 2**20),
        "tar-absolute": (_tar(tmp_path / "a.tgz", [_tarinfo(absolute)], {absolute: b"x"}),
                         absolute, 2**20),
        "tar-symlink": (_tar(tmp_path / "s.tgz", [_tarinfo("link", tarfile.SYMTYPE, "/etc")], {}),
                        "link", 2**20),
        "tar-hardlink": (_tar(tmp_path / "h.tgz", [_tarinfo("hard", tarfile.LNKTYPE, "/etc/passwd")],
                              {}), "hard", 2**20),
        "tar-device": (_tar(tmp_path / "d.tgz", [_tarinfo("dev", tarfile.CHRTYPE)], {}), "dev", 2**20),
        "tar-bomb": (_tar(tmp_path / "b.tgz", [_tarinfo("a"), _tarinfo("bomb")],
                          {"a": big, "bomb": big}), "bomb", 300_000),
    }


def _zip_symlink(path: Path) -> Path:
    info = zipfile.ZipInfo("link")
    info.external_attr = (0o120777 << 16)  # S_IFLNK, as `zip --symlinks` writes it
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize("case", ["zip-traversal", "zip-absolute", "zip-symlink", "zip-bomb",
                                  "tar-traversal", "tar-absolute", "tar-symlink", "tar-hardlink",
                                  "tar-device", "tar-bomb"])
def test_unsafe_archive_is_refused_without_side_effects(tmp_path: Path, case: str,
                                                        monkeypatch) -> None:
    written = []
    monkeypatch.setattr(download, "_copy_limited", lambda *args: written.append(args[3]))
    src = tmp_path / "src"
    src.mkdir()
    archive, member, limit = _unsafe_cases(src)[case]
    work = tmp_path / "work"
    work.mkdir()
    before = _tree(tmp_path)
    with pytest.raises(UnsafeArchiveError) as info:
        extract_archive(archive, work / "out", max_total_bytes=limit)
    assert str(archive) in str(info.value) and repr(member) in str(info.value)
    assert _tree(tmp_path) == before
    assert not (src / "escaped.txt").exists()
    assert written == []  # refused while vetting, before a single member was unpacked


def test_not_an_archive(tmp_path: Path) -> None:
    path = tmp_path / "plain.zip"
    path.write_bytes(b"not an archive at all")
    with pytest.raises(ValueError, match="not a zip or tar"):
        extract_archive(path, tmp_path / "out")
    assert _tree(tmp_path) == {"plain.zip"}
