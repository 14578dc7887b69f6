"""Decoding image files and arrays into uint8 ``[C, S, S]`` arrays, strictly and in parallel.

Every image, whatever its format, mode or size, goes through the same steps: camera rotation
applied (EXIF), transparency composited onto white, converted to grayscale (``L``) or RGB,
LANCZOS-resized to ``S x S``. These are the steps :mod:`fewshot.images` applies to new images
at inference, so a trained model sees its inputs prepared exactly like its training data.

A file that cannot be decoded (empty, truncated, corrupt, not an image) is never silently
dropped: :func:`decode_image_files` names every such file in one :class:`BadImageError`, or,
when the caller opts in, skips them and says so in one summary warning. Files are read from
folders or, as :class:`ZipMember`, straight out of zip archives (e.g. Omniglot's).
"""

from __future__ import annotations

import io
import multiprocessing
import os
import sys
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fewshot.data.download import IntegrityError

__all__ = ["MAX_IMAGE_PIXELS", "RESIZE_POLICIES", "BadImageError", "ImageSource", "ZipMember",
           "check_resize_policy", "decode_encoded_images", "too_many_pixels",
           "decode_image_files", "prepare_image",
           "prepare_image_array", "report_bad_images"]

# The most pixels an image may have: PIL's own warning threshold (about 89 million, a
# 9459 x 9459 photo), here an error, checked from the header before anything is decoded. PIL
# alone only warns up to twice that and decodes it: a small file that decodes to gigabytes
# (a decompression bomb) would be decoded.
MAX_IMAGE_PIXELS = 89_478_485


def too_many_pixels(image: Image.Image) -> str | None:
    """Why ``image`` (opened, not yet decoded) is refused as too large, or None."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        return (f"refused as a possible decompression bomb: {width} x {height} = "
                f"{width * height:,} pixels, more than the {MAX_IMAGE_PIXELS:,} an image may have")
    return None


# Below this many files a process pool costs more than it saves.
_POOL_MIN_FILES = 2000
_FILES_PER_TASK = 256
# How many bad files an error or warning names before summarising the rest as a count.
_NAMED_BAD_FILES = 20


class BadImageError(IntegrityError):
    """One or more image files cannot be decoded; the message names them and why."""


@dataclass(frozen=True)
class ZipMember:
    """The image file ``name`` inside the zip archive ``archive``, decoded without extracting."""

    archive: str
    name: str

    def __str__(self) -> str:
        return f"{self.archive}:{self.name}"


ImageSource = str | Path | ZipMember

# Re-opening a zip of 20k entries costs ~70 ms, so each process keeps its archives open while
# it decodes (decode_image_files closes them when done).
_open_zips: dict[str, zipfile.ZipFile] = {}


def _read_zip_member(member: ZipMember) -> bytes:
    archive = _open_zips.get(member.archive)
    if archive is None:
        archive = _open_zips[member.archive] = zipfile.ZipFile(member.archive)
    return archive.read(member.name)


def _forget_open_zips() -> None:
    # A forked worker must not share the parent's file offsets: it opens its own handles.
    _open_zips.clear()


def _close_open_zips() -> None:
    for archive in _open_zips.values():
        archive.close()
    _open_zips.clear()


# How a non-square image becomes the square the model takes: ``squash`` resizes it whole (the
# aspect ratio changes), ``crop`` keeps the largest centred square, ``pad`` adds white margins
# (paper, as for transparent pixels) to the shorter side. Chosen per training dataset and
# recorded in the model's preprocessing, so new images are prepared the same way.
RESIZE_POLICIES = ("squash", "crop", "pad")


def check_resize_policy(resize: str) -> None:
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_POLICIES)}, got {resize!r}")


def _square(image: Image.Image, resize: str) -> Image.Image:
    width, height = image.size
    if width == height or resize == "squash":
        return image
    side = min(width, height) if resize == "crop" else max(width, height)
    if resize == "crop":
        left, top = (width - side) // 2, (height - side) // 2
        return image.crop((left, top, left + side, top + side))
    fill = 255 if image.mode == "L" else (255, 255, 255)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def prepare_image(image: Image.Image, size: int, channels: int,
                  resize: str = "squash") -> np.ndarray:
    """A PIL image as uint8 ``[channels, size, size]`` (see the module docstring for the steps;
    ``resize``: one of :data:`RESIZE_POLICIES`)."""
    check_resize_policy(resize)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        # Transparent pixels become white paper; dropping alpha would make them black.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = _square(image.convert("L" if channels == 1 else "RGB"), resize)
    if image.size != (size, size):
        image = image.resize((size, size), Image.LANCZOS)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def prepare_image_array(images: np.ndarray, size: int, channels: int) -> np.ndarray:
    """uint8 RGB images ``[N, H, W, 3]`` as uint8 ``[N, channels, size, size]``.

    Already-decoded distributions (CIFAR-100, the mini-ImageNet pickles) pass through here, so
    their grayscale conversion and resizing are PIL's, the same as for image files.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 RGB images [N, H, W, 3], got {images.dtype} "
                         f"{list(images.shape)}")
    if channels == 3 and images.shape[1:3] == (size, size):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    out = np.empty((len(images), channels, size, size), dtype=np.uint8)
    for i, pixels in enumerate(images):
        out[i] = prepare_image(Image.fromarray(pixels), size, channels)
    return out


def _decode_file(source: ImageSource, size: int, channels: int,
                 resize: str = "squash") -> np.ndarray | str:
    """The decoded image, or why the file is not a usable image."""
    try:
        if isinstance(source, ZipMember):
            try:
                data = _read_zip_member(source)
            except KeyError:
                return "missing from the archive"
            except (zipfile.BadZipFile, zlib.error, EOFError) as exc:  # e.g. a CRC mismatch
                return f"corrupt in the archive ({exc})"
            if not data:
                return "empty file (0 bytes)"
            opened = Image.open(io.BytesIO(data))
        else:
            if os.path.getsize(source) == 0:
                return "empty file (0 bytes)"
            opened = Image.open(source)
        with opened as image:
            refused = too_many_pixels(image)
            if refused is not None:
                return refused
            image.load()  # decodes everything now, so a truncated file fails here
            return prepare_image(image, size, channels, resize)
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except Image.DecompressionBombError as exc:
        return f"refused as a possible decompression bomb ({exc})"
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data
        return f"corrupt or truncated ({exc})"


def _decode_chunk(task: tuple[list[ImageSource], int, int, str]
                  ) -> tuple[list[np.ndarray | None], list[str]]:
    sources, size, channels, resize = task
    images: list[np.ndarray | None] = []
    problems: list[str] = []
    for source in sources:
        result = _decode_file(source, size, channels, resize)
        images.append(None if isinstance(result, str) else result)
        problems.append(result if isinstance(result, str) else "")
    return images, problems


def _progress(results: Iterator, total: int, description: str) -> Iterator:
    if not sys.stdout.isatty():
        yield from results
        return
    from rich.progress import Progress

    with Progress() as progress:
        bar = progress.add_task(description, total=total)
        for chunk in results:
            progress.advance(bar, len(chunk[0]))
            yield chunk


def decode_image_files(paths: Sequence[ImageSource], size: int, channels: int,
                       description: str = "Decoding images", resize: str = "squash"
                       ) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decode ``paths`` (files, or :class:`ZipMember` s) into uint8 ``[n_good, channels, size,
    size]``, in order.

    Returns the images of the readable files and ``(str(path), reason)`` for every other file
    (the caller decides, with :func:`report_bad_images`, whether that is an error). Large jobs
    run in a pool of forked processes.
    """
    sources = [p if isinstance(p, ZipMember) else str(p) for p in paths]
    tasks = [(sources[i:i + _FILES_PER_TASK], size, channels, resize)
             for i in range(0, len(sources), _FILES_PER_TASK)]
    workers = min(os.cpu_count() or 1, 8)
    # Daemonic processes (e.g. DataLoader workers) may not have children; fork because spawn
    # would re-import torch in every worker, eating most of the gain.
    use_pool = (workers > 1 and len(sources) >= _POOL_MIN_FILES
                and not multiprocessing.current_process().daemon
                and "fork" in multiprocessing.get_all_start_methods())
    try:
        if use_pool:
            _close_open_zips()  # none to share with the workers
            with multiprocessing.get_context("fork").Pool(
                    workers, initializer=_forget_open_zips) as pool:
                chunks = list(_progress(pool.imap(_decode_chunk, tasks), len(sources),
                                        description))
        else:
            chunks = list(_progress(map(_decode_chunk, tasks), len(sources), description))
    finally:
        _close_open_zips()
    good: list[np.ndarray] = []
    bad: list[tuple[str, str]] = []
    for (task_sources, _, _, _), (images, problems) in zip(tasks, chunks, strict=True):
        for source, image, problem in zip(task_sources, images, problems, strict=True):
            if image is None:
                bad.append((str(source), problem))
            else:
                good.append(image)
    stacked = (np.stack(good) if good
               else np.empty((0, channels, size, size), dtype=np.uint8))
    return stacked, bad


def decode_encoded_images(blobs: Sequence[Any], size: int, channels: int,
                          description: str = "Decoding images"
                          ) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Decode images held in memory as encoded bytes (or uint8 arrays of them, as in
    tiered-ImageNet's pickles) into uint8 ``[n_good, channels, size, size]``, in order, with
    ``(index, reason)`` for each blob that is not a usable image. Each blob is turned into bytes
    only when decoded, so the encoded images are never held twice."""

    def decode(blob: Any) -> np.ndarray | str:
        data = np.asarray(blob, dtype=np.uint8).tobytes()
        if not data:
            return "empty image (0 bytes)"
        try:
            with Image.open(io.BytesIO(data)) as image:
                refused = too_many_pixels(image)
                if refused is not None:
                    return refused
                image.load()
                return prepare_image(image, size, channels)
        except UnidentifiedImageError:
            return "not an image PIL can read"
        except Image.DecompressionBombError as exc:
            return f"refused as a possible decompression bomb ({exc})"
        except (OSError, SyntaxError, ValueError) as exc:
            return f"corrupt or truncated ({exc})"

    def chunks() -> Iterator[tuple[list[np.ndarray | str], None]]:
        for start in range(0, len(blobs), _FILES_PER_TASK):
            yield [decode(b) for b in blobs[start:start + _FILES_PER_TASK]], None

    results = [r for chunk, _ in _progress(chunks(), len(blobs), description) for r in chunk]
    good = [r for r in results if not isinstance(r, str)]
    bad = [(index, r) for index, r in enumerate(results) if isinstance(r, str)]
    stacked = (np.stack(good) if good
               else np.empty((0, channels, size, size), dtype=np.uint8))
    return stacked, bad


def _listing(bad: Sequence[tuple[str, str]]) -> str:
    named = "\n".join(f"  {path}: {reason}" for path, reason in bad[:_NAMED_BAD_FILES])
    more = len(bad) - _NAMED_BAD_FILES
    return named + (f"\n  ... and {more} more" if more > 0 else "")


def report_bad_images(bad: Sequence[tuple[str, str]], skip: bool, what: str) -> None:
    """Raise :class:`BadImageError` naming the bad files, or warn once if ``skip``.

    ``what`` says where they are (e.g. "the 'train' split of mini-ImageNet in /data/mini").
    """
    if not bad:
        return
    if not skip:
        raise BadImageError(
            f"{len(bad)} file(s) in {what} cannot be used as images:\n{_listing(bad)}\n"
            "Fix or remove them, or pass skip_bad_images=True to leave them out."
        )
    warnings.warn(f"Skipped {len(bad)} unreadable file(s) in {what}:\n{_listing(bad)}",
                  stacklevel=3)
