"""What every network a meta-learner adapts shares: a feature extractor and a linear head."""

from __future__ import annotations

from torch import Tensor, nn


class FeaturesWithHead(nn.Module):
    """A feature extractor followed by a linear head of ``outputs`` values.

    The parameter names (``features.*``, ``head.*``) are what the algorithms rely on: ANIL
    adapts ``head_parameter_names()``, MAML's ``zero_head`` zeroes ``head.weight``.

    Args:
        features: any module with an ``out_features`` attribute mapping inputs to vectors.
        outputs: values per input (classes of a task, or real values of a regression).
    """

    def __init__(self, features: nn.Module, outputs: int) -> None:
        super().__init__()
        self.features = features
        self.head = nn.Linear(features.out_features, outputs)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [batch, ...] -> [batch, outputs]``."""
        return self.head(self.features(x))

    def head_parameter_names(self) -> frozenset[str]:
        """Names (as in ``named_parameters``) of the head's parameters: what ANIL adapts."""
        return frozenset(f"head.{name}" for name, _ in self.head.named_parameters())

    def features_parameter_names(self) -> frozenset[str]:
        """Names of the feature extractor's parameters."""
        return frozenset(f"features.{name}" for name, _ in self.features.named_parameters())
