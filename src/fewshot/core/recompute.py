"""Recompute instead of store: a function's graph rebuilt in the backward pass.

``torch.utils.checkpoint`` cannot serve the inner loop: its non-reentrant form relies on
saved-tensor hooks, which ``torch.func.grad`` refuses ("don't yet support saved tensor hooks"),
and its reentrant form refuses ``torch.autograd.grad`` and, lacking ``setup_context``, ``vmap``.
:func:`recompute` is a ``torch.autograd.Function`` whose backward is ``torch.func.vjp`` of the
recomputed function, with a generated vmap rule: it works in the per-task loop and under vmap.
Used for recomputed inner steps (:mod:`fewshot.core.inner_loop`) and for memory-bounded chunks
of tasks (:mod:`fewshot.execution.memory_budget`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import vjp
from torch.utils import _pytree as pytree


class _Recompute(torch.autograd.Function):
    """``fn(differentiable, constant) -> outputs`` without storing its graph."""

    generate_vmap_rule = True

    @staticmethod
    def forward(fn: Callable, n_differentiable: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        return fn(tensors[:n_differentiable], tensors[n_differentiable:])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        fn, n_differentiable, *tensors = inputs
        ctx.fn, ctx.n_differentiable = fn, n_differentiable
        ctx.save_for_backward(*tensors)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> tuple[Tensor | None, ...]:
        tensors = ctx.saved_tensors
        differentiable, constant = tensors[: ctx.n_differentiable], tensors[ctx.n_differentiable:]
        with torch.enable_grad():
            outputs, pullback = vjp(lambda *d: ctx.fn(d, constant), *differentiable)
        cotangents = tuple(torch.zeros_like(o) if g is None else g
                           for o, g in zip(outputs, grad_outputs, strict=True))
        return (None, None, *pullback(cotangents), *(None,) * len(constant))


def recompute(fn: Callable[[Any, Any], Any], differentiable: Any, constant: Any) -> Any:
    """``fn(differentiable, constant)``, keeping only its inputs for the backward pass.

    ``differentiable`` and ``constant`` are pytrees (dicts, tuples, ...) of tensors and plain
    values; gradients flow to the floating-point tensors of ``differentiable``, never to
    ``constant`` (data, labels). ``fn`` must return a pytree whose leaves are all tensors and be
    pure: the backward pass calls it again. Autocast settings are the same in both calls.
    """
    leaves, spec = pytree.tree_flatten((differentiable, constant))
    n_differentiable = len(pytree.tree_flatten(differentiable)[0])
    slots = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    # Gradients go to floating tensors of ``differentiable``; every other tensor rides along.
    moving = [i for i in slots if i < n_differentiable and leaves[i].is_floating_point()]
    riding = [i for i in slots if i not in moving]
    tensors = [leaves[i] for i in moving + riding]
    template = [None if i in slots else leaf for i, leaf in enumerate(leaves)]  # no tensors held
    device = tensors[0].device.type if tensors else "cpu"
    autocast_on, autocast_dtype = torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
    output_spec: list[pytree.TreeSpec] = []

    def flat(moving_values: tuple[Tensor, ...], riding_values: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        filled = list(template)
        for i, value in zip(moving + riding, moving_values + riding_values, strict=True):
            filled[i] = value
        with torch.autocast(device, dtype=autocast_dtype, enabled=autocast_on):
            out = fn(*pytree.tree_unflatten(filled, spec))
        out_leaves, out_spec = pytree.tree_flatten(out)
        output_spec[:] = [out_spec]
        return tuple(out_leaves)

    outputs = _Recompute.apply(flat, len(moving), *tensors)
    return pytree.tree_unflatten(list(outputs), output_spec[0])
