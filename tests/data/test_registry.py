"""The dataset registry: each dataset declares itself, and one line registers it."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest

from fewshot.data import registry
from fewshot.data.class_images import CachedClassImages
from fewshot.data.omniglot import Omniglot
from fewshot.data.registry import DATASETS, dataset_class, dataset_preprocessing
from fewshot.data.split_cache import StoredSplit, cache_root
from fewshot.inference.images import Preprocessing
from fewshot.training import datamodule as datamodule_module
from fewshot.training.datamodule import FewShotDataModule

# What the data module passes to every dataset (CachedClassImages' docstring).
UNIFORM_OPTIONS = {"split", "class_split", "image_size", "channels", "download", "cache_dir",
                   "skip_bad_images", "split_seed", "transform", "target_transform"}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_every_dataset_declares_its_preprocessing_and_options(name):
    cls = DATASETS[name]
    assert issubclass(cls, CachedClassImages)
    # Declared by the class itself, not inherited by accident.
    assert set(vars(cls)["preprocessing"]) == {"invert", "mean", "std"}
    assert set(inspect.signature(cls.__init__).parameters) >= UNIFORM_OPTIONS
    assert set(cls.supported_channels) <= {1, 3}
    for channels in cls.supported_channels:
        prepared = Preprocessing.for_dataset(name, image_size=20, channels=channels)
        declared = cls.preprocessing
        assert (prepared.invert, prepared.mean, prepared.std) == (
            declared["invert"], tuple(declared["mean"]), tuple(declared["std"]))
        assert (prepared.image_size, prepared.channels) == (20, channels)


def test_omniglot_is_inverted_and_photos_are_not():
    assert dataset_preprocessing("omniglot")["invert"]
    assert not any(dataset_preprocessing(n)["invert"] for n in ("mini_imagenet", "cifar_fs",
                                                                 "folder"))


def test_for_dataset_reads_the_dataset_class(monkeypatch):
    monkeypatch.setattr(Omniglot, "preprocessing",
                        {"invert": False, "mean": (0.5,), "std": (0.25,)})
    prepared = Preprocessing.for_dataset("omniglot", 28, 1)
    assert not prepared.invert and prepared.mean == (0.5,) and prepared.std == (0.25,)
    monkeypatch.setattr(Omniglot, "preprocessing", {"invert": True})
    with pytest.raises(ValueError, match="must have the keys 'invert', 'mean' and 'std'"):
        Preprocessing.for_dataset("omniglot", 28, 1)


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"no preprocessing is known for dataset 'imagenet'; "
                                         r"known: \['cifar_fs', 'folder'"):
        Preprocessing.for_dataset("imagenet", 84, 3)
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; choose one of"):
        FewShotDataModule("imagenet")
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'"):
        dataset_class("imagenet")


def test_the_data_module_takes_the_registry():
    assert datamodule_module.DATASETS is registry.DATASETS


def test_channels_are_checked_by_the_dataset_class():
    with pytest.raises(ValueError, match="Omniglot images have 1 channel, got channels=3"):
        FewShotDataModule("omniglot", channels=3)
    with pytest.raises(ValueError, match=r"channels must be 1 \(grayscale\) or 3 \(RGB\), got 2"):
        FewShotDataModule("mini_imagenet", channels=2)


class Gradients(CachedClassImages):
    """A whole new dataset in a few lines: 12 classes of 6 synthetic images."""

    preprocessing = {"invert": False, "mean": (0.5,), "std": (0.5,)}
    supported_channels = (1,)

    def __init__(self, root, split="train", class_split=None, image_size=8, channels=1,
                 download=False, cache_dir=None, skip_bad_images=False, split_seed=0,
                 transform=None, target_transform=None):
        self.split, self.image_size, self.channels = split, image_size, channels
        self.transform, self.target_transform = transform, target_transform
        first = {"train": 0, "val": 6, "test": 9}[split]
        count = 6 if split == "train" else 3
        names = [f"class{c}" for c in range(first, first + count)]

        def build() -> StoredSplit:
            values = np.repeat(np.arange(count * 6, dtype=np.uint8), image_size * image_size)
            images = values.reshape(count * 6, 1, image_size, image_size)
            return StoredSplit(images, names, [6] * count)

        self._use_cache(cache_root(cache_dir) / "gradients", "gradients", split,
                        [str(root), str(split_seed)], build, skip_bad_images, f"gradients {split}")


def test_a_new_dataset_is_one_class_and_one_registration_line(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(DATASETS, "gradients", Gradients)
    assert Preprocessing.for_dataset("gradients", 8, 1).mean == (0.5,)
    with pytest.raises(ValueError, match="Gradients images have 1 channel"):
        FewShotDataModule("gradients", channels=3)
    data = FewShotDataModule("gradients", str(tmp_path), image_size=8, channels=1,
                             cache_dir=str(tmp_path / "c"), ways=3, shots=1, queries=2,
                             meta_batch_size=2, eval_queries=2, val_episodes=2, test_episodes=2)
    data.setup("fit")
    batch = data.train_set[0]
    assert batch.support_x.shape == (2, 3, 1, 8, 8) and batch.query_x.shape == (2, 6, 1, 8, 8)
    assert data.val_set[0].support_x.shape[-3:] == (1, 8, 8)
