"""What an inner optimizer is: a differentiable, functional transform from gradient to step.

MAML adapts with plain gradient descent. An inner optimizer turns the support-set gradient of
each inner step into the *direction* the parameters move along (``params - lr * direction``),
keeping any state (momentum, Adam's moments) in a dict of tensors that is passed in and
returned, never stored. Every operation is differentiable, so second-order MAML
backpropagates through the optimizer itself, and nothing depends on a tensor's value in
Python, so the transforms run unchanged under ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fewshot.core.settings import Settings

Params = dict[str, Tensor]
State = dict[str, Tensor]


class InnerOptimizer(Settings):
    """A differentiable, functional optimizer for the inner loop (subclass and override)."""

    def init(self, params: Mapping[str, Tensor]) -> State:
        """The state before the first step (tensors only, so it can be vmapped)."""
        raise NotImplementedError

    def direction(self, grads: Params, state: State, step: int) -> tuple[Params, State]:
        """The update direction of inner ``step`` (0-based) and the new state."""
        raise NotImplementedError


def clip_by_norm(grads: Params, max_norm: float | None) -> Params:
    """Scale ``grads`` so their joint 2-norm is at most ``max_norm`` (differentiably).

    Branch-free (``min(1, max_norm / norm)``), so it runs under vmap with one norm per task.
    """
    if max_norm is None:
        return grads
    norm = torch.sqrt(sum(g.square().sum() for g in grads.values()))
    scale = torch.clamp(max_norm / (norm + 1e-12), max=1.0)
    return {name: g * scale for name, g in grads.items()}
