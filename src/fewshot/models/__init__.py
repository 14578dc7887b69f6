"""Backbones for few-shot classification: a feature extractor plus the N-way head."""

from fewshot.models.batch_norm import TransductiveBatchNorm2d
from fewshot.models.conv4 import Conv4, FewShotClassifier

__all__ = ["Conv4", "FewShotClassifier", "TransductiveBatchNorm2d"]
