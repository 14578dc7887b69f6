"""The network a meta-learner adapts: any feature extractor and a linear N-way head."""

from __future__ import annotations

from torch import Tensor, nn


class FewShotClassifier(nn.Module):
    """A feature extractor followed by a linear N-way head: the network MAML adapts.

    Args:
        features: any module with an ``out_features`` attribute mapping images to vectors.
        ways: number of classes per task (the head's outputs).
    """

    def __init__(self, features: nn.Module, ways: int) -> None:
        super().__init__()
        if ways < 2:
            raise ValueError(f"a few-shot task needs at least 2 ways, got ways={ways}")
        self.features = features
        self.head = nn.Linear(features.out_features, ways)
        nn.init.xavier_uniform_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [batch, C, H, W] -> logits [batch, ways]``."""
        return self.head(self.features(x))

    def head_parameter_names(self) -> frozenset[str]:
        """Names (as in ``named_parameters``) of the head's parameters: what ANIL adapts."""
        return frozenset(f"head.{name}" for name, _ in self.head.named_parameters())

    def features_parameter_names(self) -> frozenset[str]:
        """Names of the feature extractor's parameters."""
        return frozenset(f"features.{name}" for name, _ in self.features.named_parameters())
