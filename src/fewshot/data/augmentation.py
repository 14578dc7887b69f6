"""Training-time augmentation of few-shot tasks: random crop with padding, flip, color jitter.

The options used in the mini-ImageNet / CIFAR-FS literature (e.g. ``RandomCrop(84, padding=8)``,
``RandomHorizontalFlip()``, ``ColorJitter(0.4, 0.4, 0.4)``), implemented on batched tensors
with every random draw taken from a numpy generator the caller supplies. The sampler hands it
a generator that is a pure function of the training step, so augmented meta-batches are as
reproducible as the tasks themselves: the same whatever the DataLoader workers, and the same
after resuming a run.

``per="image"`` draws new parameters for every image; ``per="task"`` draws one set per task and
applies it to all of its support and query images, so the task's classes stay consistent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AugmentPer", "Augmentation"]

AugmentPer = Literal["image", "task"]
# ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


def _grayscale(images: Tensor) -> Tensor:
    """``[n, 3, H, W]`` -> ``[n, 1, H, W]``."""
    weights = images.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


@dataclass(frozen=True)
class Augmentation:
    """Random image transformations for meta-training tasks.

    Args:
        crop_padding: pad each side with this many zero pixels, then crop back to the original
            size at a random offset (0: off).
        horizontal_flip: mirror left-right with probability 1/2.
        color_jitter: scale brightness, contrast and saturation (RGB only) by factors drawn
            uniformly from ``[1 - color_jitter, 1 + color_jitter]`` (0: off).
        per: ``"image"`` (independent draws) or ``"task"`` (one draw for the whole task).

    Example:
        >>> augment = Augmentation(crop_padding=4, horizontal_flip=True)
        >>> task = torch.rand(10, 3, 32, 32)
        >>> augment(task, np.random.default_rng(0)).shape
        torch.Size([10, 3, 32, 32])
    """

    crop_padding: int = 0
    horizontal_flip: bool = False
    color_jitter: float = 0.0
    per: AugmentPer = "image"

    def __post_init__(self) -> None:
        if not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ValueError(f"crop_padding must be an int >= 0, got {self.crop_padding!r}")
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"color_jitter must be in [0, 1), got {self.color_jitter!r}")
        if self.per not in ("image", "task"):
            raise ValueError(f"augmentation per must be 'image' or 'task', got {self.per!r}")

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.horizontal_flip or self.color_jitter > 0

    def __call__(self, images: Tensor, rng: np.random.Generator) -> Tensor:
        """Augmented copy of float ``images: [n, C, H, W]`` in ``[0, 1]``."""
        draws = 1 if self.per == "task" else len(images)
        # Draws come in a fixed order and number for given options, so a generator state
        # always maps to the same transformations.
        if self.crop_padding:
            offsets = rng.integers(0, 2 * self.crop_padding + 1, size=(draws, 2))
            images = self._crop(images, np.broadcast_to(offsets, (len(images), 2)))
        if self.horizontal_flip:
            flips = torch.from_numpy(rng.random(draws) < 0.5).expand(len(images))
            images = torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
        if self.color_jitter:
            low, high = 1.0 - self.color_jitter, 1.0 + self.color_jitter
            factors = torch.from_numpy(rng.uniform(low, high, size=(draws, 3))).to(images.dtype)
            images = self._jitter(images, factors.expand(len(images), 3))
        return images

    def _crop(self, images: Tensor, offsets: np.ndarray) -> Tensor:
        n, channels, height, width = images.shape
        padded = F.pad(images, [self.crop_padding] * 4)
        top = torch.from_numpy(np.ascontiguousarray(offsets[:, 0]))
        left = torch.from_numpy(np.ascontiguousarray(offsets[:, 1]))
        rows = (top[:, None] + torch.arange(height))[:, None, :, None]   # [n, 1, H, 1]
        cols = (left[:, None] + torch.arange(width))[:, None, None, :]   # [n, 1, 1, W]
        return padded[torch.arange(n).view(n, 1, 1, 1), torch.arange(channels).view(1, -1, 1, 1),
                      rows, cols]

    @staticmethod
    def _jitter(images: Tensor, factors: Tensor) -> Tensor:
        brightness, contrast, saturation = (factors[:, i].view(-1, 1, 1, 1) for i in range(3))
        images = (images * brightness).clamp(0, 1)
        gray = _grayscale(images) if images.shape[1] == 3 else images
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        images = (contrast * images + (1 - contrast) * mean).clamp(0, 1)
        if images.shape[1] == 3:
            images = (saturation * images + (1 - saturation) * _grayscale(images)).clamp(0, 1)
        return images
