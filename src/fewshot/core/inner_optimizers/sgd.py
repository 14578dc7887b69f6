"""Plain gradient descent, MAML's inner optimizer."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from fewshot.core.inner_optimizers.base import InnerOptimizer, Params, State


class SGD(InnerOptimizer):
    """Plain gradient descent: the direction is the gradient (MAML)."""

    def init(self, params: Mapping[str, Tensor]) -> State:
        return {}

    def direction(self, grads: Params, state: State, step: int) -> tuple[Params, State]:
        return grads, state
