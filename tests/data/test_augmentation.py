"""Augmentation: each transformation against a reference, per-task consistency, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewshot.data.augmentation import Augmentation
from fewshot.data.episodes import MetaBatches


def _images(n: int = 6, channels: int = 3, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_disabled_options_change_nothing():
    augment = Augmentation()
    assert not augment.enabled
    images = _images()
    torch.testing.assert_close(augment(images, np.random.default_rng(0)), images)


def test_crop_is_a_window_of_the_zero_padded_image():
    images = _images(n=20)
    out = Augmentation(crop_padding=2)(images, np.random.default_rng(3))
    padded = F.pad(images, [2, 2, 2, 2])
    offsets = set()
    for image, crop in zip(padded, out, strict=True):
        matches = [(top, left) for top in range(5) for left in range(5)
                   if torch.equal(image[:, top:top + 8, left:left + 8], crop)]
        assert matches, "a crop is not a window of the padded image"
        offsets.add(matches[0])
    assert len(offsets) > 5  # per image: many different offsets


def test_flip_mirrors_about_half_of_the_images():
    images = _images(n=200, channels=1)
    out = Augmentation(horizontal_flip=True)(images, np.random.default_rng(0))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 70 < sum(flipped) < 130


def test_color_jitter_matches_the_blend_formulas():
    images = _images(n=4)
    out = Augmentation(color_jitter=0.4)(images, np.random.default_rng(5))
    b, c, s = torch.from_numpy(np.random.default_rng(5).uniform(0.6, 1.4, size=(4, 3))).float().T
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    x = (images * b.view(-1, 1, 1, 1)).clamp(0, 1)
    mean = (x * luma).sum(1, keepdim=True).mean(dim=(1, 2, 3), keepdim=True)
    x = (c.view(-1, 1, 1, 1) * x + (1 - c.view(-1, 1, 1, 1)) * mean).clamp(0, 1)
    gray = (x * luma).sum(1, keepdim=True)
    x = (s.view(-1, 1, 1, 1) * x + (1 - s.view(-1, 1, 1, 1)) * gray).clamp(0, 1)
    torch.testing.assert_close(out, x)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("per", ["image", "task"])
def test_per_task_applies_one_transformation_to_every_image(per):
    augment = Augmentation(crop_padding=3, horizontal_flip=True, color_jitter=0.3, per=per)
    same = _images(n=1).expand(12, -1, -1, -1).contiguous()  # 12 copies of one image
    out = augment(same, np.random.default_rng(1))
    identical = all(torch.equal(out[0], o) for o in out[1:])
    assert identical == (per == "task")


def test_same_generator_state_gives_the_same_augmentation():
    augment = Augmentation(crop_padding=4, horizontal_flip=True, color_jitter=0.2)
    images = _images()
    torch.testing.assert_close(augment(images, np.random.default_rng(9)),
                               augment(images, np.random.default_rng(9)))
    assert not torch.equal(augment(images, np.random.default_rng(9)),
                           augment(images, np.random.default_rng(10)))


@pytest.mark.parametrize("bad", [dict(crop_padding=-1), dict(color_jitter=1.0),
                                 dict(color_jitter=-0.1), dict(per="episode")])
def test_bad_options_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Augmentation(**bad)


class _Constant:
    """Class c image i is filled with (c * 10 + i) / 255, 3 channels, 6x6."""

    def __init__(self, classes: int = 8, per_class: int = 10) -> None:
        self.classes = [f"c{i}" for i in range(classes)]
        self.class_sizes = [per_class] * classes

    def load_class_images(self, class_id, indices):
        values = torch.tensor([(class_id * 10 + i) / 255 for i in indices])
        return values.view(-1, 1, 1, 1).expand(-1, 3, 6, 6).clone()


def test_meta_batches_augment_from_the_step_alone_and_keep_the_tasks():
    data = _Constant()
    plain = MetaBatches(data, 3, 1, 2, tasks_per_batch=2, seed=4, length=100)
    augment = Augmentation(crop_padding=2, horizontal_flip=True, per="task")
    augmented = MetaBatches(data, 3, 1, 2, tasks_per_batch=2, seed=4, length=100,
                            augmentation=augment)
    again = MetaBatches(data, 3, 1, 2, tasks_per_batch=2, seed=4, length=100,
                        augmentation=augment)
    torch.testing.assert_close(augmented[17], again[17])  # a resumed run sees the same batch
    a, p = augmented[17], plain[17]
    assert not torch.equal(a.support_x, p.support_x)
    torch.testing.assert_close(a.query_y, p.query_y)
    # Same classes and images: the centre pixel (never padding for padding 2 on 6x6) is kept.
    torch.testing.assert_close(a.query_x[..., 2:4, 2:4].amax(dim=(-1, -2, -3)),
                               p.query_x[..., 2:4, 2:4].amax(dim=(-1, -2, -3)))
