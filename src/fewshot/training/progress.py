"""Progress bars that say how far a run is: the iteration out of its total, and for a
time-limited run (``--trainer.max_time``, as the CPU config) the time spent and left.

Lightning's bars count epochs; a run limited by time or steps has ``max_epochs=-1`` and its
Rich bar read "Epoch 0/-2" for the whole run.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, Timer, TQDMProgressBar


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def run_progress(trainer: Trainer) -> dict[str, str]:
    """``{"iteration": "120/60000"}`` (or ``"120"`` without a step limit) and, when the run has
    a time limit, ``{"elapsed": "3:20", "left": "16:40"}``."""
    limit = trainer.max_steps
    items = {"iteration": f"{trainer.global_step}/{limit}" if limit and limit > 0
             else str(trainer.global_step)}
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    if timer is not None and getattr(timer, "_duration", None) is not None:
        elapsed = timer.time_elapsed("train")
        items["elapsed"] = _clock(elapsed)
        items["left"] = _clock(timer._duration - elapsed)
    return items


def _epoch_description(trainer: Trainer, epoch: int) -> str:
    # "Epoch 3/9" when the run has an epoch limit; never "Epoch 0/-2".
    limit = trainer.max_epochs
    return f"Epoch {epoch}/{limit - 1}" if limit is not None and limit > 0 else f"Epoch {epoch}"


class MetaRichProgressBar(RichProgressBar):
    """Rich's bar (on a terminal) with the iteration, elapsed and remaining time."""

    def _get_train_description(self, current_epoch: int) -> str:
        description = _epoch_description(self.trainer, current_epoch)
        if len(self.validation_description) > len(description):
            description = f"{description:{len(self.validation_description)}}"
        return description

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        return {**run_progress(trainer), **super().get_metrics(trainer, pl_module)}


class MetaProgressBar(TQDMProgressBar):
    """Lightning's plain bar (logs, CI) with the iteration, elapsed and remaining time."""

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(_epoch_description(trainer, trainer.current_epoch))

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        return {**run_progress(trainer), **super().get_metrics(trainer, pl_module)}
