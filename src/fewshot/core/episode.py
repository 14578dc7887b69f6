"""The unit of few-shot learning: a batch of N-way K-shot tasks."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class Episodes(NamedTuple):
    """``T`` tasks of ``N`` ways, each with ``K`` support and ``Q`` query images per class.

    Labels are remapped per task to ``0..N-1``. Lightning moves NamedTuples between devices
    as a whole, so this travels as the batch of every step. Regression tasks (sine waves,
    :mod:`fewshot.data.sinusoid`) have one way: float inputs and targets ``[T, K, 1]`` and
    ``[T, Q, 1]``.

    Attributes:
        support_x: ``[T, N*K, C, H, W]`` float images the model adapts on.
        support_y: ``[T, N*K]`` int64 labels.
        query_x: ``[T, N*Q, C, H, W]`` float images the adapted model is scored on.
        query_y: ``[T, N*Q]`` int64 labels.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]
