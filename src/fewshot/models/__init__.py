"""Backbones for few-shot classification: a feature extractor plus the N-way head."""

from fewshot.models.batch_norm import TransductiveBatchNorm2d
from fewshot.models.conv4 import Conv4, FewShotClassifier
from fewshot.models.resnet12 import ResNet12

__all__ = ["Conv4", "FewShotClassifier", "ResNet12", "TransductiveBatchNorm2d"]
