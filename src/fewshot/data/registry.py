"""The datasets fewshot trains on, by the name configs and exports use.

A dataset is one module defining a :class:`~fewshot.data.class_images.CachedClassImages`
subclass (which says there what it needs: its constructor options, ``preprocessing``,
``supported_channels``), plus one line in :data:`DATASETS` below. Everything else (the
training data module, the preprocessing stored with exports) looks datasets up here.
"""

from __future__ import annotations

from typing import Any

from fewshot.data.cifar_fs import CIFARFS
from fewshot.data.class_images import CachedClassImages
from fewshot.data.fc100 import FC100
from fewshot.data.image_folder import ImageFolder
from fewshot.data.mini_imagenet import MiniImageNet
from fewshot.data.omniglot import Omniglot
from fewshot.data.tiered_imagenet import TieredImageNet

__all__ = ["DATASETS", "REGRESSION_DATASETS", "class_split_for", "dataset_class",
           "dataset_preprocessing", "task_of"]

DATASETS: dict[str, type[CachedClassImages]] = {
    "omniglot": Omniglot,
    "mini_imagenet": MiniImageNet,
    "cifar_fs": CIFARFS,
    "tiered_imagenet": TieredImageNet,
    "fc100": FC100,
    "folder": ImageFolder,
}
# Tasks generated from functions, not drawn from images: regression, scored by mean squared
# error (fewshot.data.sinusoid, MAML's sine waves). Served by the data module itself.
REGRESSION_DATASETS = ("sinusoid",)


def task_of(dataset: str) -> str:
    """``regression`` for a dataset of :data:`REGRESSION_DATASETS`, else ``classification``:
    what the model is (head, loss, metric) follows from the data."""
    return "regression" if dataset in REGRESSION_DATASETS else "classification"


def dataset_class(name: str) -> type[CachedClassImages]:
    """The dataset class registered as ``name``; ValueError naming the choices if none is."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name]


def dataset_preprocessing(name: str) -> dict[str, Any]:
    """What the dataset ``name`` declares a new image needs besides decoding: ``invert``,
    ``mean`` and ``std`` (see :class:`fewshot.inference.images.Preprocessing`)."""
    cls = DATASETS.get(name)
    declared = getattr(cls, "preprocessing", None)
    if not isinstance(declared, dict):
        raise ValueError(
            f"no preprocessing is known for dataset {name!r}; known: {sorted(DATASETS)} (a "
            "dataset is registered in fewshot.data.registry.DATASETS and declares a "
            "'preprocessing' class attribute)")
    if set(declared) != {"invert", "mean", "std"}:
        raise ValueError(f"{cls.__name__}.preprocessing must have the keys 'invert', 'mean' and "
                         f"'std', got {sorted(declared)}")
    return {"invert": bool(declared["invert"]), "mean": tuple(declared["mean"]),
            "std": tuple(declared["std"])}


def class_split_for(name: str, class_split: str | None) -> str | None:
    """The ``class_split`` dataset ``name`` should use when asked for ``class_split``.

    A split that only another dataset knows by name (``maml`` from an Omniglot config,
    ``ravi`` from a mini-ImageNet one) means that dataset's standard split: pointing a shipped
    config at other data (``--data.dataset folder --data.root DIR``) then uses the new
    dataset's standard split (None) instead of refusing a name it never had. Anything else,
    a folder of split files included, is passed on for the dataset to accept or refuse.
    """
    if class_split is None or class_split in dataset_class(name).named_class_splits:
        return class_split
    others = {split for cls in DATASETS.values() if cls is not DATASETS[name]
              for split in cls.named_class_splits}
    return None if class_split in others else class_split
