"""The default run logger: CSV and TensorBoard in one run folder, with no extra setup.

Two separate Lightning loggers would each pick their own ``version_N`` folder; this one writes
``metrics.csv`` and the TensorBoard event file side by side, so a run is one folder that
``fewshot report`` and ``tensorboard --logdir`` both read.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.utilities.logger import _add_prefix, _convert_params
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor


class RunLogger(CSVLogger):
    """:class:`~lightning.pytorch.loggers.CSVLogger` that also writes TensorBoard events.

    ``experiment`` is TensorBoard's ``SummaryWriter``, as with Lightning's TensorBoard logger,
    so ``self.logger.experiment.add_image(...)`` works in a LightningModule; the CSV writer is
    ``csv``, and ``metrics.csv`` is written as by the CSV logger.

    Args:
        save_dir: parent folder of the runs; None: ``--trainer.default_root_dir`` in the
            ``fewshot`` CLI, ``runs`` elsewhere.
        name: experiment folder inside ``save_dir``.
        version: run folder name or number (default: the next free ``version_N``).
        tensorboard: also write TensorBoard events (scalars, histograms, whatever is sent to
            ``experiment``); False makes ``experiment`` the CSV writer.
    """

    def __init__(self, save_dir: str | None = None, name: str = "lightning_logs",
                 version: int | str | None = None, tensorboard: bool = True) -> None:
        super().__init__(save_dir="runs" if save_dir is None else save_dir, name=name,
                         version=version)
        self._tensorboard = tensorboard
        self._writer = None

    def _get_next_version(self) -> int:
        # Two runs started at the same moment in one folder would both find version_N free
        # and write into each other's files: the run folder is claimed by creating it
        # (mkdir fails for the second), on the process that writes the logs.
        version = super()._get_next_version()
        if rank_zero_only.rank != 0 or "://" in str(self.root_dir):
            return version
        Path(self.root_dir).mkdir(parents=True, exist_ok=True)
        while True:
            try:
                (Path(self.root_dir) / f"version_{version}").mkdir()
                return version
            except FileExistsError:
                version += 1

    @property
    def tensorboard(self):
        """The ``SummaryWriter`` of this run (created on first use), or None if disabled."""
        if self._writer is None and self._tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.csv  # noqa: B018  the CSV writer first: it warns about a folder already in use
            self._writer = SummaryWriter(log_dir=self.log_dir)
        return self._writer

    @property
    @rank_zero_experiment
    def experiment(self):
        """TensorBoard's ``SummaryWriter`` (the CSV writer when TensorBoard is off)."""
        return self.tensorboard if self._tensorboard else self.csv

    @property
    def csv(self):
        """The CSV writer behind ``metrics.csv`` and ``hparams.yaml``."""
        return CSVLogger.experiment.fget(self)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        metrics = _add_prefix(dict(metrics), self._prefix, self.LOGGER_JOIN_CHAR)
        if step is None:
            step = len(self.csv.metrics)
        self.csv.log_metrics(metrics, step)
        if (step + 1) % self._flush_logs_every_n_steps == 0:
            self.save()
        if self.tensorboard is not None:
            for name, value in metrics.items():
                if name != "epoch":
                    self.tensorboard.add_scalar(name, float(value), global_step=step)

    @rank_zero_only
    def log_histogram(self, name: str, values: Tensor, step: int) -> None:
        """A histogram of ``values`` in TensorBoard (``fewshot report`` keeps its own)."""
        if self.tensorboard is not None:
            self.tensorboard.add_histogram(name, values.detach().float().cpu(), global_step=step)

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Any, metrics: Any = None) -> None:
        self.csv.log_hparams(_convert_params(params))

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._experiment is not None:  # nothing was logged in this process otherwise
            self.save()
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    @rank_zero_only
    def save(self) -> None:
        self.csv.save()
        if self._writer is not None:
            self._writer.flush()


def run_folder(trainer: Any) -> Path | None:
    """The run folder (where ``metrics.csv`` goes), read without a collective.

    ``Trainer.log_dir`` broadcasts from rank 0, so every process must ask for it together;
    code that runs on rank 0 alone (``rank_zero_only``, ``is_global_zero``) would leave the
    others waiting in their next collective, and gloo then fails with "Received data size
    doesn't match expected size". Loggers that keep local files (CSV, TensorBoard, fewshot's)
    know their folder locally.
    """
    for logger in getattr(trainer, "loggers", []):
        folder = getattr(logger, "log_dir", None)
        if isinstance(folder, (str, Path)):
            return Path(folder)
    if getattr(trainer, "loggers", []):
        save_dir = getattr(trainer.loggers[0], "save_dir", None)
        if save_dir is not None:
            return Path(save_dir)
    default = getattr(trainer, "default_root_dir", None)
    return Path(default) if default is not None else None


def _finite(values: Tensor) -> Tensor:
    values = values.detach().float().cpu().flatten()
    return values[torch.isfinite(values)]


def log_histograms(logger: object, histograms: Mapping[str, Tensor], step: int) -> None:
    """Send histograms to any logger that takes them (fewshot's, TensorBoard's, W&B's).

    Only the finite values are binned: a NaN or Inf gradient (a step ``nonfinite=skip`` is
    about to skip) must not crash the run, and TensorBoard refuses to bin it. W&B gets one
    ``log`` call per step, so the step's histograms are one row of its history.
    """
    finite = {name: _finite(values) for name, values in histograms.items()}
    finite = {name: values for name, values in finite.items() if values.numel()}
    if not finite:
        return
    if type(logger).__name__ == "WandbLogger":
        import wandb

        logger.log_metrics({name: wandb.Histogram(v.numpy()) for name, v in finite.items()},
                           step=step)
        return
    for name, values in finite.items():
        if isinstance(logger, RunLogger):
            logger.log_histogram(name, values, step)
        elif hasattr(getattr(logger, "experiment", None), "add_histogram"):  # TensorBoardLogger
            logger.experiment.add_histogram(name, values, global_step=step)


def log_histogram(logger: object, name: str, values: Tensor, step: int) -> None:
    """One histogram: :func:`log_histograms` with one entry."""
    log_histograms(logger, {name: values}, step)


__all__ = ["RunLogger", "log_histogram", "log_histograms", "run_folder"]
