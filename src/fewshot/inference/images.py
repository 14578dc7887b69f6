"""Turn a user's images (files, PIL images, tensors) into the tensors a trained model expects.

A model only works on images prepared exactly like its training data: the datasets' decoding
step (:func:`fewshot.data.image_decoding.prepare_image`: grayscale or RGB, LANCZOS-resized to
``image_size``), then what the dataset class declares as its ``preprocessing`` (for Omniglot,
inverted so strokes are bright on a dark background), then scaled to ``[0, 1]`` and
normalised. :class:`Preprocessing` records those steps (it is stored in every export)
and applies them to new images, so a drawing of dark strokes on white paper reaches an Omniglot
model looking like the characters it was meta-trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from fewshot.data.image_decoding import check_resize_policy, prepare_image, too_many_pixels
from fewshot.data.registry import dataset_preprocessing

ImageInput = str | Path | Image.Image | Tensor
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageError(ValueError):
    """An image that cannot be given to the model; the message names the image."""


@dataclass(frozen=True)
class Preprocessing:
    """How images were prepared for training, to prepare new images the same way.

    Args:
        channels: 1 (grayscale) or 3 (RGB).
        image_size: side of the square the model takes.
        invert: ``255 - pixel`` before scaling (Omniglot: dark strokes become bright).
        mean, std: per channel, applied after scaling to ``[0, 1]``: ``(x - mean) / std``.
        resize: how a non-square image becomes square, as the training data did (``squash``,
            ``crop`` or ``pad``; :data:`fewshot.data.image_decoding.RESIZE_POLICIES`).
    """

    channels: int
    image_size: int
    invert: bool = False
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resize: str = "squash"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"preprocessing channels must be 1 or 3, got {self.channels!r}")
        if not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"preprocessing image_size must be a positive int, got {self.image_size!r}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                raise ValueError(f"preprocessing {name} needs 1 or {self.channels} values, got {list(values)}")
        if not all(s > 0 for s in self.std):
            raise ValueError(f"preprocessing std must be positive, got {list(self.std)}")
        check_resize_policy(self.resize)

    @classmethod
    def for_dataset(cls, dataset: str, image_size: int, channels: int,
                    resize: str = "squash") -> Preprocessing:
        """The preprocessing of a registered dataset (:mod:`fewshot.data.registry`), as its
        class declares it, with the resize policy the training data used."""
        return cls(channels=channels, image_size=image_size, resize=resize,
                   **dataset_preprocessing(dataset))

    def to_dict(self) -> dict[str, Any]:
        fields = asdict(self)
        return {**fields, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Preprocessing:
        known = {"channels", "image_size", "invert", "mean", "std"}
        try:
            return cls(
                channels=fields["channels"], image_size=fields["image_size"],
                invert=bool(fields.get("invert", False)),
                mean=tuple(float(v) for v in fields.get("mean", (0.0,))),
                std=tuple(float(v) for v in fields.get("std", (1.0,))),
                # Exports before the policy was chosen wrote "lanczos": they squashed.
                resize={"lanczos": "squash"}.get(fields.get("resize"),
                                                 fields.get("resize") or "squash"),
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"preprocessing needs {sorted(known)}, got {fields!r} ({error})") from error

    def prepare(self, images: ImageInput | Sequence[ImageInput]) -> tuple[Tensor, list[str]]:
        """``images`` as one float tensor ``[B, channels, image_size, image_size]`` plus names.

        Files and PIL images go through the training preprocessing. Tensors ``[C, H, W]`` or
        ``[B, C, H, W]`` are taken as already prepared (e.g. from a fewshot dataset); a 1-channel
        tensor is repeated for an RGB model, and a square one is resized. Names are file paths,
        else ``image[i]``, for messages and outputs.
        """
        items = _as_list(images)
        if not items:
            raise ImageError("no images given")
        tensors, names = [], []
        for index, item in enumerate(items):
            if isinstance(item, Tensor):
                batch = item if item.dim() == 4 else item[None] if item.dim() == 3 else None
                if batch is None:
                    raise ImageError(f"image[{index}] is a tensor of shape {tuple(item.shape)}; "
                                     "expected [C, H, W] or [B, C, H, W]")
                for image in batch:
                    name = f"image[{len(names)}]"
                    tensors.append(self._prepared_tensor(image, name))
                    names.append(name)
                continue
            name = _name_of(item, len(names))
            tensors.append(self._prepared_pil(_open(item, name), name))
            names.append(name)
        return torch.stack(tensors), names

    def _prepared_pil(self, image: Image.Image, name: str) -> Tensor:
        # The datasets' own decoding step (rotation flag, transparency as white paper,
        # grayscale or RGB, the training data's resize policy for non-square images, LANCZOS),
        # so new images are prepared exactly like them.
        pixels = prepare_image(image, self.image_size, self.channels, self.resize)
        if self.invert:
            pixels = 255 - pixels
        return self._normalised(torch.from_numpy(pixels.copy()).float().div_(255.0))

    def _normalised(self, tensor: Tensor) -> Tensor:
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (tensor - mean) / std

    def _prepared_tensor(self, image: Tensor, name: str) -> Tensor:
        if not image.is_floating_point():
            raise ImageError(f"{name} is a {image.dtype} tensor; pass float tensors prepared like "
                             "the training data, or pass files or PIL images to prepare them")
        channels, height, width = image.shape
        if channels != self.channels:
            if channels != 1:
                raise ImageError(
                    f"{name} has {channels} channels but the model takes {self.channels}; only "
                    "1-channel tensors are converted (by repetition). Pass a file or PIL image "
                    "to have it converted like the training data."
                )
            image = image.expand(self.channels, height, width)
        if (height, width) != (self.image_size, self.image_size):
            if height != width:
                raise ImageError(f"{name} is {width}x{height}, not square: resizing it to "
                                 f"{self.image_size}x{self.image_size} would distort it")
            image = F.interpolate(image[None].float(), size=self.image_size, mode="bilinear",
                                  antialias=True, align_corners=False)[0]
        return image.float().contiguous()


def _as_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if isinstance(images, (str, Path, Image.Image, Tensor)):
        return [images]
    if not isinstance(images, Sequence):
        raise ImageError(f"images must be a path, a PIL image, a tensor or a list of them, "
                         f"got a {type(images).__name__}")
    return list(images)


def _name_of(item: ImageInput, index: int) -> str:
    if isinstance(item, (str, Path)):
        return str(item)
    return getattr(item, "filename", "") or f"image[{index}]"


def _open(item: ImageInput, name: str) -> Image.Image:
    if isinstance(item, Image.Image):
        return item
    if not isinstance(item, (str, Path)):
        raise ImageError(f"{name} is a {type(item).__name__}; pass a file path, a PIL image or a tensor")
    path = Path(item)
    if path.is_dir():
        raise ImageError(f"{name} is a folder; pass its image files")
    if not path.is_file():
        raise ImageError(f"image file {name} does not exist")
    try:
        with Image.open(path) as image:
            refused = too_many_pixels(image)  # from the header, before decoding a bomb
            if refused is not None:
                raise ImageError(f"{name}: {refused}")
            image.load()
            return image
    except Image.DecompressionBombError as error:
        raise ImageError(f"{name}: refused as a possible decompression bomb ({error})") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageError(f"{name} is not a readable image ({error})") from error
