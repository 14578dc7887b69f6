"""The network a meta-learner adapts: any feature extractor and a linear N-way head."""

from __future__ import annotations

from torch import nn

from fewshot.models.with_head import FeaturesWithHead


class FewShotClassifier(FeaturesWithHead):
    """A feature extractor followed by a linear N-way head: the network MAML adapts.

    Args:
        features: any module with an ``out_features`` attribute mapping images to vectors.
        ways: number of classes per task (the head's outputs).
    """

    def __init__(self, features: nn.Module, ways: int) -> None:
        if ways < 2:
            raise ValueError(f"a few-shot task needs at least 2 ways, got ways={ways}")
        super().__init__(features, ways)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)
