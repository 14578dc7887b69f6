"""Differentiable inner-loop optimizers: one file each, one registration line each here."""

from fewshot.core.inner_optimizers.adam import Adam
from fewshot.core.inner_optimizers.base import InnerOptimizer, clip_by_norm
from fewshot.core.inner_optimizers.momentum import Momentum
from fewshot.core.inner_optimizers.sgd import SGD
from fewshot.core.settings import build_from_settings

# Names a command line or a file may use; looked up, never imported.
INNER_OPTIMIZERS: dict[str, type[InnerOptimizer]] = {
    "sgd": SGD,
    "momentum": Momentum,
    "adam": Adam,
}



def build_inner_optimizer(spec: dict | str) -> InnerOptimizer:
    """The inner optimizer recorded as ``{"class_path", "init_args"}`` or named (``adam``)."""
    if isinstance(spec, str) and spec in INNER_OPTIMIZERS:
        return INNER_OPTIMIZERS[spec]()
    known = {f"{c.__module__}.{c.__qualname__}": c for c in INNER_OPTIMIZERS.values()}
    return build_from_settings(spec, known, "inner_optimizer")


__all__ = ["INNER_OPTIMIZERS", "SGD", "Adam", "InnerOptimizer", "Momentum", "build_inner_optimizer",
           "clip_by_norm"]
