"""Datasets by name, and which class split each uses when a config names another's."""

from __future__ import annotations

import pytest

from fewshot.data.registry import DATASETS, class_split_for


@pytest.mark.parametrize(("dataset", "asked", "used"), [
    ("folder", "maml", None), ("folder", "ravi", None), ("folder", "random", "random"),
    ("omniglot", "lake", "lake"), ("omniglot", "ravi", None), ("omniglot", None, None),
    ("mini_imagenet", "maml", None), ("cifar_fs", "bertinetto", "bertinetto"),
    ("folder", "my/split/files", "my/split/files"),  # a folder of split files: the dataset decides
    ("mini_imagenet", "nonsense", "nonsense"),       # refused by the dataset, by name
])
def test_a_split_only_another_dataset_knows_means_the_standard_split(dataset, asked, used):
    assert class_split_for(dataset, asked) == used


def test_every_dataset_declares_its_named_splits():
    for name, cls in DATASETS.items():
        assert cls.named_class_splits, name
