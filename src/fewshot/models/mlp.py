"""The fully connected network of MAML's sine-wave regression (Finn et al., 2017, section 5.1)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class MLP(nn.Module):
    """Feature extractor: ``[Linear, ReLU]`` per hidden layer, on inputs of ``in_features``.

    With the meta-learner's one-output head, ``MLP(1, [40, 40])`` is MAML's 1-40-40-1 ReLU
    regression network. Inputs are vectors ``[batch, in_features]``; a trailing singleton shape
    (``[batch, in_features, 1, 1]``) is flattened first.

    Args:
        in_features: size of one input (1 for a sine wave's ``x``).
        hidden_features: width of each hidden layer, in order.

    Example:
        >>> import torch
        >>> features = MLP(in_features=1, hidden_features=[40, 40])
        >>> features(torch.zeros(5, 1)).shape, features.out_features
        (torch.Size([5, 40]), 40)
    """

    def __init__(self, in_features: int = 1, hidden_features: Sequence[int] = (40, 40)) -> None:
        super().__init__()
        hidden_features = tuple(hidden_features)
        if not hidden_features or min(in_features, *hidden_features) < 1:
            raise ValueError(
                f"MLP needs a positive input size and at least one positive hidden width, got "
                f"in_features={in_features}, hidden_features={list(hidden_features)}")
        # Kept so the backbone can be described and rebuilt (fewshot.models.registry).
        self.in_features, self.hidden_features = in_features, hidden_features
        layers: list[nn.Module] = []
        width = in_features
        for hidden in hidden_features:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.layers = nn.Sequential(*layers)
        self.out_features = width

    def forward(self, x: Tensor) -> Tensor:
        """``x: [batch, in_features] -> [batch, out_features]``."""
        return self.layers(x.flatten(1))
