"""Downloading and unpacking dataset archives, defensively.

Everything here is written so that a half-finished step can never be mistaken for a finished
one: downloads land in a ``.part`` file and extractions in a hidden sibling directory, and both
are renamed into place only once complete and verified.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import shutil
import stat
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

__all__ = [
    "MANIFEST_NAME",
    "DatasetNotFoundError",
    "IntegrityError",
    "UnsafeArchiveError",
    "check_download",
    "download_resumable",
    "download_url",
    "extract_archive",
    "md5sum",
    "sha256sum",
]

_CHUNK = 1 << 20


class DatasetNotFoundError(RuntimeError):
    """The data is not available locally and could not be fetched."""


class IntegrityError(ValueError):
    """A file or archive does not have the content it should have."""


class UnsafeArchiveError(ValueError):
    """An archive member would escape the destination, is not a plain file, or is too big."""


def md5sum(path: str | Path, chunk_size: int = _CHUNK) -> str:
    """Hex md5 of a file, read in chunks so large archives do not need to fit in memory."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def sha256sum(path: str | Path, chunk_size: int = _CHUNK) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _progress_enabled() -> bool:
    # A progress bar in a log file or CI output is just noise.
    return sys.stdout.isatty()


def _network_error(url: str, destination: Path, md5: str | None, exc: BaseException) -> Exception:
    checksum = f" (md5 {md5})" if md5 else ""
    return DatasetNotFoundError(
        f"Download of {url} failed: {exc}. You may be offline or the server may be unreachable. "
        f"To use a local copy instead, place the file at {destination}{checksum} and run again."
    )


def _read_chunks(response: IO[bytes], url: str, destination: Path, md5: str | None) -> Iterator[bytes]:
    while True:
        try:
            chunk = response.read(_CHUNK)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            # socket.timeout is an OSError; a cut connection is an IncompleteRead
            raise _network_error(url, destination, md5, exc) from exc
        if not chunk:
            return
        yield chunk


def _stream_to_file(response: IO[bytes], out: IO[bytes], url: str, destination: Path,
                    md5: str | None, total: int | None = None, done: int = 0) -> None:
    if total is None:
        length = response.headers.get("Content-Length") if hasattr(response, "headers") else None
        total = int(length) if length and length.isdigit() else None
    chunks = _read_chunks(response, url, destination, md5)
    if not _progress_enabled():
        for chunk in chunks:
            out.write(chunk)
            out.flush()  # what is written survives a kill, to be resumed
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task(f"Downloading {destination.name}", total=total, completed=done)
        for chunk in chunks:
            out.write(chunk)
            out.flush()
            progress.advance(task, len(chunk))


def download_url(url: str, destination: str | Path, md5: str | None = None, *,
                 timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination`` unless a good copy is already there.

    An existing file is kept when ``md5`` is None or matches; otherwise it is fetched again.
    Raises :class:`DatasetNotFoundError` when the network fails and :class:`IntegrityError`
    when the downloaded bytes do not match ``md5`` (nothing is left on disk in either case).
    """
    destination = Path(destination)
    if destination.is_file() and (md5 is None or md5sum(destination) == md5):
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except (TimeoutError, urllib.error.URLError, OSError) as exc:  # timeouts included
        raise _network_error(url, destination, md5, exc) from exc
    try:
        with response, open(part, "wb") as out:
            _stream_to_file(response, out, url, destination, md5)
        if md5 is not None:
            actual = md5sum(part)
            if actual != md5:
                # A stale destination with the wrong content must not survive either.
                destination.unlink(missing_ok=True)
                raise IntegrityError(
                    f"Downloaded file {destination} from {url} is corrupt: "
                    f"expected md5 {md5}, got {actual}. The file was deleted."
                )
        os.replace(part, destination)
    finally:
        part.unlink(missing_ok=True)
    return destination


MANIFEST_NAME = "fewshot-downloads.json"


def _total_size(response: http.client.HTTPResponse, offset: int) -> int | None:
    """The full file size the server announces, for a whole (200) or partial (206) reply."""
    if response.status == 206:  # Content-Range: bytes <first>-<last>/<total>
        total = response.headers.get("Content-Range", "").rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = response.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


def download_resumable(url: str, destination: str | Path, *, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``destination``, resuming what an interrupted run left.

    Bytes arrive in ``destination.part``, which is kept when the connection fails or the
    process is killed; the next call asks the server for the rest (an HTTP Range request) and
    starts over only if the server cannot resume. The file is renamed into place once it has
    the size the server announced. The SHA-256 of the finished file is recorded in the
    folder's manifest (:data:`MANIFEST_NAME`), which :func:`check_download` verifies later.
    Raises :class:`DatasetNotFoundError` naming the URL when the network or server fails.
    """
    destination = Path(destination)
    if destination.is_file():
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    part = destination.with_name(destination.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                          timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:  # nothing left to send: the .part may be complete
            response = None
        else:
            raise _network_error(url, destination, None, exc) from exc
    except (TimeoutError, urllib.error.URLError, OSError) as exc:
        raise _network_error(url, destination, None, exc) from exc
    total = None
    if response is not None:
        with response:
            if offset and response.status != 206:
                offset = 0  # the server sent the whole file again: start over
            total = _total_size(response, offset)
            with open(part, "ab" if offset else "wb") as out:
                _stream_to_file(response, out, url, destination, None, total, offset)
    size = part.stat().st_size
    if total is not None and size != total:
        raise DatasetNotFoundError(
            f"Download of {url} stopped after {size} of {total} bytes; {part} is kept: run "
            "again to resume it")
    os.replace(part, destination)
    _record_download(destination, url)
    return destination


def _manifest(folder: Path) -> dict[str, dict]:
    path = folder / MANIFEST_NAME
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{path} is not a readable download manifest ({exc}); delete it "
                             "to stop checking downloads against it") from exc
    if not isinstance(entries, dict):
        raise IntegrityError(f"{path} is not a download manifest (a JSON object)")
    return entries


def _write_manifest(folder: Path, entries: dict[str, dict]) -> None:
    path = folder / MANIFEST_NAME
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def _record_download(path: Path, url: str) -> None:
    entries = _manifest(path.parent)
    stat_result = path.stat()
    entries[path.name] = {"sha256": sha256sum(path), "size": stat_result.st_size,
                          "mtime_ns": stat_result.st_mtime_ns, "url": url}
    _write_manifest(path.parent, entries)


def check_download(path: str | Path) -> None:
    """Verify ``path`` against the SHA-256 recorded when fewshot downloaded it.

    Files fewshot did not download are not in the manifest and pass. A file whose size and
    modification time are those recorded passes at once; otherwise it is hashed, and a file
    whose content changed raises :class:`IntegrityError` naming it (a corrupted disk, a
    partial copy, an edited file).
    """
    path = Path(path)
    entry = _manifest(path.parent).get(path.name)
    if entry is None:
        return
    stat_result = path.stat()
    if stat_result.st_size == entry.get("size") and stat_result.st_mtime_ns == entry.get("mtime_ns"):
        return
    actual = sha256sum(path)
    if actual != entry.get("sha256"):
        raise IntegrityError(
            f"{path} has changed since it was downloaded from {entry.get('url', 'its source')}: "
            f"its SHA-256 is {actual}, the download recorded {entry.get('sha256')}. Delete it "
            "and run again with --data.download true to fetch it again.")
    # Same bytes, new timestamp (e.g. copied): remember it, so the next check is instant.
    entry["mtime_ns"] = stat_result.st_mtime_ns
    with contextlib.suppress(OSError):  # a read-only data folder stays unchecked-fast, not broken
        entries = _manifest(path.parent)
        entries[path.name] = entry
        _write_manifest(path.parent, entries)


def _member_target(archive: Path, name: str) -> PurePosixPath:
    """The relative path a member extracts to, or an error if it would leave the destination."""
    # Backslashes are separators on Windows, so "..\\x" must be treated as traversal too.
    normalized = name.replace("\\", "/")
    path = PurePosixPath(normalized)
    has_drive = len(normalized) > 1 and normalized[1] == ":"
    if path.is_absolute() or has_drive:
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path")
    if ".." in path.parts:
        raise UnsafeArchiveError(f"{archive}: member {name!r} escapes the destination via '..'")
    parts = [p for p in path.parts if p not in ("", ".")]
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def _check_budget(archive: Path, name: str, total: int, limit: int) -> None:
    if total > limit:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} brings the uncompressed size to over {limit} bytes "
            "(refusing a possible archive bomb; raise max_total_bytes if it is genuine)"
        )


def _plan_zip(archive: Path, zf: zipfile.ZipFile, limit: int) -> list[tuple[str, bool]]:
    plan, total = [], 0
    for info in zf.infolist():
        _member_target(archive, info.filename)
        # Many writers store permission bits without a file type; only an explicit type counts.
        file_type = stat.S_IFMT(info.external_attr >> 16)
        if file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise UnsafeArchiveError(
                f"{archive}: member {info.filename!r} is a link or special file, not a plain file"
            )
        total += info.file_size
        _check_budget(archive, info.filename, total, limit)
        plan.append((info.filename, info.is_dir()))
    return plan


def _plan_tar(archive: Path, tf: tarfile.TarFile, limit: int) -> list[tarfile.TarInfo]:
    plan, total = [], 0
    for member in tf.getmembers():
        _member_target(archive, member.name)
        if not (member.isfile() or member.isdir()):
            kind = ("symlink" if member.issym() else "hardlink" if member.islnk()
                    else "device or special file")
            raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a {kind}")
        total += member.size
        _check_budget(archive, member.name, total, limit)
        plan.append(member)
    return plan


def _copy_limited(src: IO[bytes], target: Path, archive: Path, name: str, written: int,
                  limit: int) -> int:
    # Headers can lie about sizes, so the budget is enforced on the bytes actually written.
    with open(target, "wb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            _check_budget(archive, name, written, limit)
            out.write(chunk)
    return written


def _extract_into(archive: Path, workdir: Path, limit: int) -> None:
    written = 0
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name, is_dir in _plan_zip(archive, zf, limit):
                target = workdir / _member_target(archive, name)
                if is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src:
                    written = _copy_limited(src, target, archive, name, written, limit)
        return
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in _plan_tar(archive, tf, limit):
                target = workdir / _member_target(archive, member.name)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tf.extractfile(member)
                assert src is not None  # regular files always have a payload
                with src:
                    written = _copy_limited(src, target, archive, member.name, written, limit)
        return
    raise ValueError(f"{archive}: not a zip or tar archive")


# Errors of the disk being written (full, read-only, no permission), not of the archive.
_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def _damaged(archive: Path, error: BaseException) -> IntegrityError:
    if isinstance(error, ValueError) and str(error).startswith(f"{archive}:"):
        return IntegrityError(str(error))  # already names the archive
    return IntegrityError(f"{archive} is a damaged or unsupported archive "
                          f"({type(error).__name__}: {error}); download it again")


def _move_into_place(workdir: Path, destination: Path) -> None:
    if not destination.exists():
        os.replace(workdir, destination)
        return
    # Merging into an existing folder: each top-level entry is swapped in with a rename, so
    # at any moment an entry is either the old complete one or the new complete one.
    for entry in sorted(workdir.iterdir()):
        target = destination / entry.name
        if target.is_dir() and not target.is_symlink():
            trash = Path(tempfile.mkdtemp(prefix=f".{entry.name}.old-", dir=destination))
            os.replace(target, trash / entry.name)
            os.replace(entry, target)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            if target.is_symlink() or target.exists():
                target.unlink()
            os.replace(entry, target)


def extract_archive(archive: str | Path, destination: str | Path,
                    max_total_bytes: int = 20 * 2**30) -> None:
    """Safely extract a zip or tar(.gz/.bz2/.xz) archive into the folder ``destination``.

    Every member is vetted before anything is written: absolute paths, ``..`` traversal,
    links and device files, and a total uncompressed size above ``max_total_bytes`` raise
    :class:`UnsafeArchiveError`. Members are unpacked into a hidden temporary sibling of
    ``destination`` and moved into place only when all of them are done; top-level entries
    that already exist in ``destination`` are replaced.
    """
    archive, destination = Path(archive), Path(destination)
    if not archive.is_file():
        raise FileNotFoundError(f"Archive {archive} does not exist")
    destination.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{destination.name}.extracting-",
                                    dir=destination.parent))
    try:
        try:
            _extract_into(archive, workdir, max_total_bytes)
        except UnsafeArchiveError:
            raise
        except OSError as error:
            if error.errno in _DISK_ERRNOS:  # the disk, not the archive: say so as it is
                raise
            raise _damaged(archive, error) from error
        except Exception as error:  # zipfile and tarfile raise many types on damaged input
            raise _damaged(archive, error) from error
        _move_into_place(workdir, destination)
    finally:
        if workdir.exists():
            shutil.rmtree(workdir, ignore_errors=True)
