"""Which inner step a forward pass belongs to, for layers that behave per step (MAML++).

The functional core wraps every forward in ``inner_step(k)``, where ``k`` is the number of
inner updates already applied to the parameters. Layers with per-step state (per-step batch
norm) read it with :func:`current_inner_step`; layers without simply ignore it, so backbones
need no extra forward argument. Batch statistics that per-step batch norm collects during
meta-training are returned by value through :func:`recording_statistics` rather than written
into buffers, so the core stays pure under ``vmap`` and ``grad``; the LightningModule updates
the running statistics outside, in one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from torch import Tensor

_STEP: ContextVar[int] = ContextVar("fewshot_inner_step", default=0)
_ON_SUPPORT: ContextVar[bool] = ContextVar("fewshot_on_support", default=False)
_RECORDER: ContextVar[dict[str, list[Tensor]] | None] = ContextVar("fewshot_recorder", default=None)


@contextmanager
def inner_step(step: int, on_support: bool = False) -> Iterator[None]:
    """Run the forward passes inside as those of parameters after ``step`` inner updates,
    on the support set (adaptation) or not (predictions)."""
    step_token, support_token = _STEP.set(step), _ON_SUPPORT.set(on_support)
    try:
        yield
    finally:
        _STEP.reset(step_token)
        _ON_SUPPORT.reset(support_token)


def current_inner_step() -> int:
    return _STEP.get()


def adapting_on_support() -> bool:
    """Whether the current forward pass is one of the inner loop's, on the support set."""
    return _ON_SUPPORT.get()


@contextmanager
def recording_statistics() -> Iterator[dict[str, list[Tensor]]]:
    """Collect ``record_statistic`` calls made inside, keyed by name (e.g. layer and step)."""
    recorded: dict[str, list[Tensor]] = {}
    token = _RECORDER.set(recorded)
    try:
        yield recorded
    finally:
        _RECORDER.reset(token)


def record_statistic(key: str, value: Tensor) -> None:
    """Hand ``value`` to the innermost active recorder, if any (else it is dropped)."""
    recorded = _RECORDER.get()
    if recorded is not None:
        recorded.setdefault(key, []).append(value)


def merge_statistics(into: dict[str, list[Tensor]], recorded: dict[str, Tensor]) -> None:
    for key, value in recorded.items():
        into.setdefault(key, []).append(value)


def mean_statistics(recorded: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    """One value per key: the mean of everything recorded under it."""
    return {key: sum(values) / len(values) for key, values in recorded.items()}
