"""What a run does around the meta-steps: the non-finite policy, throughput, results files.

Each is a Lightning callback the ``fewshot`` CLI adds by default (``--nonfinite.policy``), so
the LightningModule stays about the meta-step alone.
"""

from __future__ import annotations

import json
import time
from typing import Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from fewshot.core.evaluation import format_test_result
from fewshot.training.loggers import run_folder
from fewshot.training.provenance import provenance


class NonFinitePolicy(Callback):
    """What a NaN or Inf in the meta-loss or meta-gradient does.

    Args:
        policy: ``stop`` the run with an error naming the meta-iteration (no checkpoint is
            written after it), or ``skip`` that meta-step with a warning (the weights and the
            optimizer state stay as they were; every process skips it, since the gradients
            are all-reduced before this check).
    """

    def __init__(self, policy: Literal["stop", "skip"] = "stop") -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"nonfinite policy must be 'stop' or 'skip', got {policy!r}")
        self.policy = policy
        self.skipped_steps = 0
        self._bad_loss: float | None = None

    def _nonfinite(self, pl_module: LightningModule, what: str, step: int) -> None:
        message = f"non-finite {what} at meta-iteration {step}"
        if self.policy == "stop":
            raise FloatingPointError(message + " (set --nonfinite.policy skip to skip such steps)")
        rank_zero_warn(message + ": meta-step skipped")
        self.skipped_steps += 1
        pl_module.log("train/skipped_steps", float(self.skipped_steps))

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule,
                           loss: torch.Tensor) -> None:
        self._bad_loss = None if torch.isfinite(loss).all() else float(loss.detach().float().sum())
        if self._bad_loss is not None and self.policy == "stop":
            self._nonfinite(pl_module, f"meta-loss ({self._bad_loss})", trainer.global_step)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        gradients = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if self._bad_loss is None and all(torch.isfinite(g).all() for g in gradients):
            return
        what = (f"meta-loss ({self._bad_loss})" if self._bad_loss is not None
                else "meta-gradient")
        self._bad_loss = None
        self._nonfinite(pl_module, what, trainer.global_step)
        # Adam leaves parameters without a gradient untouched, moments included.
        for parameter in pl_module.parameters():
            parameter.grad = None

    def state_dict(self) -> dict:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))


class Throughput(Callback):
    """Logs ``train/tasks_per_s``: the meta-batch's tasks (all processes' together under DDP)
    over the wall time between two steps; and ``train/elapsed_s``: the run's wall time since
    its fit began (validation included; a resumed run carries on from its checkpoint's
    figure), so that runs can be compared against time (``fewshot report RUN_A RUN_B``)."""

    def __init__(self) -> None:
        self._last: float | None = None
        self._elapsed_before = 0.0  # wall time of earlier runs this one resumes
        self._started: float | None = None
        self.trained = False  # whether this process meta-trained (fit ran)
        self._fit_ended = False

    def elapsed(self) -> float:
        """Wall seconds of meta-training so far, earlier runs of a resumed fit included."""
        running = 0.0 if self._started is None else time.perf_counter() - self._started
        return self._elapsed_before + running

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = time.perf_counter()
        self.trained = True

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The clock stops with meta-training: a test after fit is not training time.
        self._elapsed_before, self._started = self.elapsed(), None
        self._fit_ended = True

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last = None  # validation in between would distort the rate

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The time of each validation, for accuracy against time (training rows are written
        # only every log_every_n_steps).
        if self._started is not None and not trainer.sanity_checking:
            pl_module.log("val/elapsed_s", self.elapsed())

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            # Under DDP each process holds its share; the rate is of the whole meta-batch.
            hparams = getattr(trainer.datamodule, "hparams", {}) if trainer.datamodule else {}
            tasks = hparams.get("meta_batch_size") or batch.num_tasks * trainer.world_size
            pl_module.log("train/tasks_per_s", tasks / (now - self._last), prog_bar=True)
        pl_module.log("train/elapsed_s", self.elapsed())
        self._last = now

    def state_dict(self) -> dict:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state_dict: dict) -> None:
        # A resumed fit carries on from the checkpoint's clock (restored before or, with some
        # strategies, just after on_fit_start); a test after this process's fit loads the
        # best checkpoint, which must not turn the clock back to its time.
        if not self._fit_ended:
            self._elapsed_before = float(state_dict.get("elapsed_s", 0.0))


def training_record(trainer: Trainer) -> dict[str, float | int | None]:
    """Meta-iterations trained and the wall time of meta-training (None when this process did
    not train: ``fewshot test`` of a saved checkpoint)."""
    throughput = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
    trained = throughput is not None and throughput.trained
    return {"meta_iterations": trainer.global_step,
            "wall_time_s": round(throughput.elapsed(), 1) if trained else None}


class TestResultsWriter(Callback):
    """Writes ``test_results.json`` in the run folder after testing, and prints the summary.

    The file records, besides the accuracies, where they came from
    (:mod:`fewshot.training.provenance`): seeds, class split, the checkpoint's SHA-256, a hash of
    the test episodes, the git commit and the versions."""

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        result = getattr(pl_module, "test_result", None)
        if result is None or not trainer.is_global_zero:
            return
        result = {**result, "training": training_record(trainer), "provenance": provenance(trainer)}
        directory = run_folder(trainer)  # not trainer.log_dir: a collective, rank 0 is alone here
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "test_results.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(format_test_result(result) + f"\nWrote {path}")
