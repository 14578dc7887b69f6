"""Heavy-ball momentum in the inner loop."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fewshot.core.inner_optimizers.base import InnerOptimizer, Params, State


class Momentum(InnerOptimizer):
    """Heavy-ball momentum as ``torch.optim.SGD`` computes it: ``v = momentum * v + g``.

    Args:
        momentum: the decay of the velocity, in ``[0, 1)``.
    """

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"inner momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)

    def init(self, params: Mapping[str, Tensor]) -> State:
        return {f"velocity/{name}": torch.zeros_like(p) for name, p in params.items()}

    def direction(self, grads: Params, state: State, step: int) -> tuple[Params, State]:
        velocity = {name: self.momentum * state[f"velocity/{name}"] + g for name, g in grads.items()}
        return velocity, {f"velocity/{name}": v for name, v in velocity.items()}
