"""A backbone of the user's own, registered from Python: trained, exported, loaded, adapted;
a file still cannot name a class that was not registered."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

import fewshot
from fewshot.algorithms import MAML
from fewshot.inference.export import CheckpointError
from fewshot.models import register_backbone
from fewshot.models.batch_norm import TransductiveBatchNorm2d
from fewshot.training.datamodule import FewShotDataModule
from fewshot.training.module import MetaLearner


class TinyNet(nn.Module):
    """Two conv blocks; keeps its arguments as attributes, as register_backbone asks."""

    def __init__(self, in_channels: int = 1, width: int = 6, image_size: int = 28) -> None:
        super().__init__()
        self.in_channels, self.width, self.image_size = in_channels, width, image_size
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), TransductiveBatchNorm2d(width),
            nn.ReLU(), nn.MaxPool2d(4),
            nn.Conv2d(width, width, 3, padding=1), TransductiveBatchNorm2d(width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.fixture
def registered():
    from fewshot.models.registry import BACKBONES

    register_backbone(TinyNet)
    yield f"{TinyNet.__module__}.{TinyNet.__qualname__}"
    BACKBONES.pop(f"{TinyNet.__module__}.{TinyNet.__qualname__}", None)


def test_a_registered_backbone_exports_loads_and_adapts(registered, fake_omniglot, tmp_path):
    root, cache = fake_omniglot
    data = FewShotDataModule(root=str(root), cache_dir=str(cache), ways=3, queries=2,
                             meta_batch_size=2, eval_queries=2, val_episodes=2,
                             steps_per_epoch=2, image_size=28)
    torch.manual_seed(0)
    model = MetaLearner(TinyNet(width=5), ways=3, algorithm=MAML(inner_steps=1, inner_lr=0.3))
    trainer = Trainer(max_steps=2, default_root_dir=tmp_path, logger=False,
                      inference_mode=False, enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    trainer.save_checkpoint(tmp_path / "tiny.ckpt")

    fewshot.load(tmp_path / "tiny.ckpt").save(tmp_path / "export")
    metadata = json.loads((tmp_path / "export" / "fewshot.json").read_text())
    assert metadata["backbone"] == {"class_path": registered,
                                    "init_args": {"in_channels": 1, "width": 5, "image_size": 28}}
    learner = fewshot.load(tmp_path / "export")
    support, labels = torch.rand(6, 1, 28, 28), ["a", "a", "b", "b", "c", "c"]
    queries = torch.rand(4, 1, 28, 28)
    predicted = learner.adapt(support, labels).predict(queries)
    # The same numbers as the trained module itself adapting to the same task.
    x, _ = learner.preprocessing.prepare(list(support))
    adapted = model.adapt(x, torch.tensor([0, 0, 1, 1, 2, 2]))
    q, _ = learner.preprocessing.prepare(list(queries))
    expected = model.predict_logits(adapted, q).softmax(dim=-1)
    torch.testing.assert_close(predicted.probabilities, expected, rtol=1e-5, atol=1e-6)
    # A reader that never registered the class: the file names it, nothing is imported.
    from fewshot.models.registry import BACKBONES

    BACKBONES.pop(registered)
    with pytest.raises(CheckpointError, match="is not one fewshot rebuilds from a file"):
        fewshot.load(tmp_path / "export").adapt(support, labels)
