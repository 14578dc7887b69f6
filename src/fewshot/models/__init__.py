"""Backbones for few-shot classification: feature extractors plus the N-way head."""

from fewshot.models.batch_norm import TransductiveBatchNorm2d
from fewshot.models.classifier import FewShotClassifier
from fewshot.models.conv4 import Conv4
from fewshot.models.mlp import MLP
from fewshot.models.registry import (
    BACKBONES,
    BackboneError,
    backbone_settings,
    build_backbone,
    register_backbone,
)
from fewshot.models.regressor import FewShotRegressor
from fewshot.models.resnet12 import ResNet12
from fewshot.models.with_head import FeaturesWithHead

__all__ = ["BACKBONES", "BackboneError", "Conv4", "FeaturesWithHead", "FewShotClassifier", "FewShotRegressor",
           "MLP", "ResNet12",
           "TransductiveBatchNorm2d", "backbone_settings", "build_backbone", "register_backbone"]
