"""The network a meta-learner adapts to regression tasks: a feature extractor and a linear output."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from fewshot.models.with_head import FeaturesWithHead


class FewShotRegressor(FeaturesWithHead):
    """A feature extractor followed by a linear head of ``outputs`` real values per input.

    Laid out as :class:`~fewshot.models.FewShotClassifier` (``features.*``, ``head.*``), so the
    algorithms that adapt the head only (ANIL) work unchanged. ``task_loss`` is the loss its
    outputs are scored by: the algorithms take it from the network they are built with
    (a classifier's default is cross-entropy).

    Args:
        features: any module with an ``out_features`` attribute mapping inputs to vectors.
        outputs: real values predicted per input (1 for a sine wave).

    Example:
        >>> import torch
        >>> from fewshot.models import MLP
        >>> network = FewShotRegressor(MLP(1, [40, 40]))  # MAML's 1-40-40-1 network
        >>> network(torch.zeros(5, 1)).shape
        torch.Size([5, 1])
    """

    task_loss = staticmethod(F.mse_loss)

    def __init__(self, features: nn.Module, outputs: int = 1) -> None:
        if outputs < 1:
            raise ValueError(f"a regression head needs at least 1 output, got outputs={outputs}")
        super().__init__(features, outputs)
