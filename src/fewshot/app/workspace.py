"""The page's classes and images, kept in one temporary folder.

An uploaded file is stored as ``<folder>/<random id>.<format>``: the name the browser sends is
shown on the page and never used as a path, so no upload can land outside the folder. Every
upload is checked before it is kept: its size against the limit, that it decodes as an image,
and the number of images held.
"""

from __future__ import annotations

import io
import re
import secrets
import threading
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

ID_PATTERN = re.compile(r"[0-9a-f]{16}")
MAX_NAME_LENGTH = 100
# What PIL decodes and browsers show as thumbnails.
FORMATS = {"PNG": "png", "JPEG": "jpg", "GIF": "gif", "BMP": "bmp", "WEBP": "webp", "TIFF": "tif"}


class WorkspaceError(ValueError):
    """A request the workspace refuses; ``status`` is the HTTP status that says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class StoredImage:
    """An uploaded image: ``name`` as the browser sent it (for display), ``path`` where it is."""

    id: str
    name: str
    path: Path
    format: str


@dataclass
class ImageClass:
    id: str
    name: str
    images: list[StoredImage] = field(default_factory=list)


class Workspace:
    """Classes of support images and a list of query images, stored under ``folder``.

    Args:
        folder: an existing, empty folder of the server's own (a temporary one).
        max_upload_bytes: the largest file accepted.
        max_images: the most images held at once, support and query together.

    ``support_version`` grows with every change to the classes or their images, so that an
    adapted model can tell it is out of date. Methods are safe to call from several threads.
    """

    def __init__(self, folder: Path, max_upload_bytes: int, max_images: int) -> None:
        if max_upload_bytes < 1 or max_images < 1:
            raise ValueError(f"limits must be positive, got max_upload_bytes={max_upload_bytes}, "
                             f"max_images={max_images}")
        self.folder, self.max_upload_bytes, self.max_images = folder, max_upload_bytes, max_images
        self.classes: list[ImageClass] = []
        self.queries: list[StoredImage] = []
        self.support_version = 0
        self._lock = threading.RLock()

    # Classes -------------------------------------------------------------------------------

    def add_class(self, name: str | None = None) -> ImageClass:
        with self._lock:
            if name is None or not str(name).strip():
                number = len(self.classes) + 1
                while f"class {number}" in self._names():
                    number += 1
                name = f"class {number}"
            image_class = ImageClass(_new_id(), self._checked_name(name))
            self.classes.append(image_class)
            self.support_version += 1
            return image_class

    def rename_class(self, class_id: str, name: Any) -> ImageClass:
        with self._lock:
            image_class = self._class(class_id)
            if name != image_class.name:
                image_class.name = self._checked_name(name, ignore=image_class)
                self.support_version += 1
            return image_class

    def delete_class(self, class_id: str) -> None:
        with self._lock:
            image_class = self._class(class_id)
            self.classes.remove(image_class)
            for image in image_class.images:
                image.path.unlink(missing_ok=True)
            self.support_version += 1

    # Images --------------------------------------------------------------------------------

    def add_image(self, class_id: str | None, filename: str, data: bytes) -> StoredImage:
        """Keep ``data`` as an image of class ``class_id``, or as a query image when None."""
        name = display_name(filename)
        if len(data) > self.max_upload_bytes:
            raise too_large(name, len(data), self.max_upload_bytes)
        image_format = decoded_format(name, data)
        with self._lock:
            target = self.queries if class_id is None else self._class(class_id).images
            if self.image_count() >= self.max_images:
                raise WorkspaceError(f"{name} was not added: the page holds at most "
                                     f"{self.max_images} images (fewshot app --max-images); "
                                     "delete some first", 409)
            image_id = _new_id()
            path = self.folder / f"{image_id}.{FORMATS[image_format]}"
            path.write_bytes(data)
            image = StoredImage(image_id, name, path, image_format)
            target.append(image)
            if class_id is not None:
                self.support_version += 1
            return image

    def delete_image(self, image_id: str) -> None:
        with self._lock:
            for owner, images in [(c, c.images) for c in self.classes] + [(None, self.queries)]:
                for image in images:
                    if image.id == image_id:
                        images.remove(image)
                        image.path.unlink(missing_ok=True)
                        if owner is not None:
                            self.support_version += 1
                        return
            raise WorkspaceError(f"no image {image_id!r} (deleted already?)", 404)

    def clear_queries(self) -> None:
        with self._lock:
            for image in self.queries:
                image.path.unlink(missing_ok=True)
            self.queries = []

    def image(self, image_id: str) -> StoredImage:
        with self._lock:
            for image in [i for c in self.classes for i in c.images] + self.queries:
                if image.id == image_id:
                    return image
        raise WorkspaceError(f"no image {image_id!r}", 404)

    def image_count(self) -> int:
        return sum(len(c.images) for c in self.classes) + len(self.queries)

    # The task ------------------------------------------------------------------------------

    def support(self) -> tuple[list[Path], list[str], int]:
        """Image paths and class names of the support set, in the page's order, with the
        ``support_version`` they belong to; refused (with what to do) unless there are at
        least two classes and every class has an image."""
        with self._lock:
            if len(self.classes) < 2:
                have = ("no classes" if not self.classes
                        else f"one class ({self.classes[0].name!r})")
                raise WorkspaceError(f"a task needs at least 2 classes, and the page has {have}: "
                                     "add a class and give it a few images", 409)
            empty = [c.name for c in self.classes if not c.images]
            if empty:
                raise WorkspaceError(f"class {empty[0]!r} has no images: add a few, or delete the "
                                     "class", 409)
            paths = [i.path for c in self.classes for i in c.images]
            labels = [c.name for c in self.classes for _ in c.images]
            return paths, labels, self.support_version

    def snapshot(self) -> dict[str, Any]:
        """The classes and queries as the page shows them (JSON-ready)."""
        with self._lock:
            return {
                "classes": [{"id": c.id, "name": c.name, "images": [_image_json(i) for i in c.images]}
                            for c in self.classes],
                "queries": [_image_json(i) for i in self.queries],
                "support_version": self.support_version,
            }

    def _class(self, class_id: str) -> ImageClass:
        for image_class in self.classes:
            if image_class.id == class_id:
                return image_class
        raise WorkspaceError(f"no class {class_id!r} (deleted already?)", 404)

    def _names(self, ignore: ImageClass | None = None) -> set[str]:
        return {c.name for c in self.classes if c is not ignore}

    def _checked_name(self, name: Any, ignore: ImageClass | None = None) -> str:
        if not isinstance(name, str):
            raise WorkspaceError(f"a class name must be text, got {name!r}")
        name = " ".join(name.split())  # no tabs, newlines or runs of spaces
        if not name:
            raise WorkspaceError("a class name cannot be empty")
        if len(name) > MAX_NAME_LENGTH:
            raise WorkspaceError(f"a class name has at most {MAX_NAME_LENGTH} characters, got "
                                 f"{len(name)}")
        if name in self._names(ignore):
            raise WorkspaceError(f"there is already a class named {name!r}", 409)
        return name


def display_name(filename: str) -> str:
    """The name a browser sent for a file, made safe to show: its last path part, printable,
    at most 200 characters."""
    name = re.split(r"[/\\]", filename or "")[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    return name[:200] or "unnamed file"


def too_large(name: str, size: int, limit: int) -> WorkspaceError:
    return WorkspaceError(f"{name} is {_megabytes(size)}; the limit is {_megabytes(limit)} per "
                          "file (fewshot app --max-upload-mb)", 413)


def decoded_format(name: str, data: bytes) -> str:
    """The format of ``data`` if it decodes fully as an image a browser can show, else an
    error that says what the file is."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                image_format = image.format
                image.load()
    except UnidentifiedImageError as error:  # before OSError, of which it is a kind
        raise WorkspaceError(f"{name} is not an image (accepted: {', '.join(FORMATS)})") from error
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise WorkspaceError(f"{name} has too many pixels to be a photo ({error})") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise WorkspaceError(f"{name} is a damaged image and cannot be read ({error})") from error
    if image_format not in FORMATS:
        raise WorkspaceError(f"{name} is a {image_format} image; use "
                             f"{', '.join(FORMATS)}")
    return image_format


def _megabytes(size: int) -> str:
    return f"{size / 1_000_000:.1f} MB" if size >= 1_000_000 else f"{size / 1000:.1f} kB"


def _new_id() -> str:
    return secrets.token_hex(8)


def _image_json(image: StoredImage) -> dict[str, str]:
    return {"id": image.id, "name": image.name}
