"""Whether a ``torch.func`` transform is active around the current call.

Some computations have a faster exact form outside transforms (plain autograd, fused kernels)
and must fall back to transform-safe forms inside them; these two questions decide which.
"""

from __future__ import annotations

try:  # private, but the only way to see a vmap level from inside grad(vmap(...)) or vmap(grad(...))
    from torch._functorch.pyfunctorch import TransformType as _TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
except ImportError:  # pragma: no cover - an older or newer torch: always take the exact path
    retrieve_all_functorch_interpreters = None


def inside_vmap() -> bool:
    """Whether any ``torch.func.vmap`` is active around the current call (at any depth).

    A tensor's own ``is_batchedtensor`` is not enough: under ``vmap(grad(f))`` the tensor ``f``
    sees is a gradient wrapper around the batched one. When the check is unavailable, the
    answer is ``True``, which selects the exact path everywhere.
    """
    if retrieve_all_functorch_interpreters is None:
        return True
    return any(i.key() == _TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def inside_functorch_transform() -> bool:
    """Whether any ``torch.func`` transform (vmap, grad, vjp, jvp, ...) is active; ``True``
    when that cannot be told, which selects paths that work under every transform."""
    if retrieve_all_functorch_interpreters is None:
        return True
    return bool(retrieve_all_functorch_interpreters())
