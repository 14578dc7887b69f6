"""A meta-step that does not fit in memory: an error that says which settings bound it.

Second-order MAML keeps every inner step of every task until the meta-backward, so memory
grows with tasks x steps x image size. When an allocation fails (the CPU allocator under a
memory limit such as ``ulimit -v`` or a container's, CUDA out of memory, Python's
``MemoryError``), the run ends with :class:`MetaStepMemoryError` naming the executors that
bound a meta-step's memory (:mod:`fewshot.execution.memory_budget`), instead of a traceback
from inside a convolution. What the operating system's out-of-memory killer does (SIGKILL,
with no chance to say anything) a memory limit turns into this error.
"""

from __future__ import annotations

import torch

_ALLOCATION_FAILED = ("can't allocate memory", "CUDA out of memory", "out of memory",
                      "Cannot allocate memory")


class MetaStepMemoryError(ValueError):
    """The meta-step needs more memory than the process may use."""


def meta_step_memory_error(error: BaseException) -> MetaStepMemoryError | None:
    """The error to show for ``error`` if it is a failed allocation, else None."""
    failed = isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and any(s in str(error) for s in _ALLOCATION_FAILED))
    if not failed:
        return None
    detail = next((line.strip() for line in str(error).splitlines() if line.strip()),
                  type(error).__name__)
    if "DefaultCPUAllocator" in detail:
        detail = detail[detail.index("DefaultCPUAllocator"):]
    return MetaStepMemoryError(
        f"the meta-step needs more memory than this process may use ({detail[:200]}). Bound "
        "it: --model.executor fewshot.execution.MemoryBudget --model.executor.budget_gib G "
        "(memory_budget_gib: the tasks run in recomputed chunks that fit in G GiB), or "
        "--model.executor fewshot.execution.RecomputeInnerSteps (checkpoint_inner_steps: each "
        "inner step recomputed in the backward pass); or lower --data.meta_batch_size, "
        "--data.image_size or the inner steps")


__all__ = ["MetaStepMemoryError", "meta_step_memory_error"]
