"""Exports made in the test itself, without training: a network and an algorithm built with
fewshot.models / fewshot.algorithms, weights perturbed so that a mix-up shows, written with
fewshot.inference.export (format 2)."""

from __future__ import annotations

from pathlib import Path

import torch

from fewshot.algorithms import Algorithm
from fewshot.core.inner_optimizers import SGD, InnerOptimizer
from fewshot.inference.export import AdaptableModel, ModelFiles, make_metadata, write_export
from fewshot.inference.images import Preprocessing
from fewshot.models import Conv4, FewShotClassifier, backbone_settings

OMNIGLOT = Preprocessing.for_dataset("omniglot", image_size=28, channels=1)


def tiny_model(algorithm: Algorithm, ways: int = 3, inner_optimizer: InnerOptimizer | None = None,
               seed: int = 0) -> tuple[AdaptableModel, dict]:
    """A built 8-filter Conv4 model with every tensor (learned rates, running statistics too)
    moved from its initial value, and its format-2 metadata."""
    torch.manual_seed(seed)
    backbone = Conv4(1, 8, 28)
    settings = backbone_settings(backbone)  # before MAML++ replaces its batch norms
    network = FewShotClassifier(backbone, ways)
    inner_optimizer = inner_optimizer or SGD()
    algorithm.build(network, inner_optimizer)
    model = AdaptableModel(network, algorithm).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if "running_var" in name:
                tensor.uniform_(0.5, 1.5, generator=generator)
            elif "inner_lrs" in name:  # rates that differ by tensor, entry and step
                tensor.mul_(torch.empty(tensor.shape).uniform_(0.5, 1.5, generator=generator))
            else:
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
    metadata = make_metadata(settings, ways, algorithm.settings(), inner_optimizer.settings(),
                             OMNIGLOT, {"made_by": "tests/inference/tiny_exports.py"})
    return model, metadata


def export_model(model: AdaptableModel, metadata: dict, directory: Path) -> Path:
    return export_weights(model.state_dict(), metadata, directory)


def export_weights(state_dict: dict[str, torch.Tensor], metadata: dict, directory: Path) -> Path:
    return write_export(ModelFiles(metadata, state_dict, directory), directory)


def images(count: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 1, 28, 28, generator=generator, dtype=dtype)
