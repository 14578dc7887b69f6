"""The pure core: the episode type, the inner loop, the inner optimizers. Plain torch only."""

from fewshot.core.episode import Episodes
from fewshot.core.inner_loop import InnerLoop, TaskResult, adapt, predict, task_query_metrics

__all__ = ["Episodes", "InnerLoop", "TaskResult", "adapt", "predict", "task_query_metrics"]
