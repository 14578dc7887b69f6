"""What a run shows while it trains: meta-gradient norms and histograms, learned inner rates.

The original project tracked ``--track_grad_norm=2`` (removed in Lightning 2) and watched its
gradient histograms collapse to zero. :class:`MetaGradientMonitor` gives both back: the norm of
the meta-gradient, total and per parameter tensor, every ``log_every_n_steps``; histograms of
meta-gradients and weights to TensorBoard / W&B, plus a compact copy in the run folder
(``histograms.jsonl``) that ``fewshot report`` draws without a server; and MAML++'s learned
inner learning rates over time.

Histograms are snapshots on a schedule that needs no run length: every step at first, then
every 2, 4, 8... steps, the interval doubling after each :data:`SNAPSHOTS_PER_INTERVAL`
snapshots. A 2-minute run of 171 meta-iterations gets 56 snapshots, a 50,000-iteration one
185: a picture over time for any run, at a cost that grows with the log of its length.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import grad_norm, rank_zero_only
from torch import Tensor

from fewshot.training.loggers import log_histograms, run_folder

# Histogram bins of log10 |value|: gradients that collapse to zero slide to the left edge.
LOG10_BINS = torch.linspace(-12.0, 2.0, 57)
#: Snapshots taken at each interval (1, 2, 4, ... steps) before the interval doubles.
SNAPSHOTS_PER_INTERVAL = 16


def histogram_due(step: int, per_interval: int = SNAPSHOTS_PER_INTERVAL) -> bool:
    """Whether meta-iteration ``step`` takes a histogram snapshot under the doubling schedule:
    steps 0..15 each, then every 2nd step for 16 snapshots, every 4th, ... A pure function
    of the step, so a resumed run keeps the schedule."""
    start, interval = 0, 1
    while step >= start + per_interval * interval:
        start += per_interval * interval
        interval *= 2
    return (step - start) % interval == 0


def log_magnitude_histogram(values: Tensor) -> list[int]:
    """Counts of ``log10 |values|`` in :data:`LOG10_BINS` (exact zeros in the first bin;
    NaN and Inf left out: ``meta_grad_nonfinite`` counts them)."""
    values = values.detach().flatten()
    magnitudes = values[torch.isfinite(values)].abs().double().clamp_min(1e-300).log10()
    magnitudes = magnitudes.clamp(LOG10_BINS[0].item(), LOG10_BINS[-1].item())
    counts = torch.histc(magnitudes, bins=len(LOG10_BINS) - 1,
                         min=LOG10_BINS[0].item(), max=LOG10_BINS[-1].item())
    return [int(c) for c in counts.tolist()]


class MetaGradientMonitor(Callback):
    """Log meta-gradient norms, histograms and learned inner rates.

    Args:
        norm_type: the p of the p-norm (2 as the original ``--track_grad_norm=2``); ``0``
            switches norm logging off.
        log_every_n_steps: interval of norm and inner-rate logging.
        histogram_every_n_steps: interval of histograms; ``None`` (default): the doubling
            schedule of :func:`histogram_due` (a few dozen snapshots in any run); ``0``: never.
    """

    def __init__(self, norm_type: float = 2.0, log_every_n_steps: int = 25,
                 histogram_every_n_steps: int | None = None) -> None:
        if norm_type < 0 or log_every_n_steps < 1 or (histogram_every_n_steps or 0) < 0:
            raise ValueError(
                f"need norm_type >= 0, log_every_n_steps >= 1, histogram_every_n_steps >= 0; got "
                f"{norm_type}, {log_every_n_steps}, {histogram_every_n_steps}")
        self.norm_type, self.log_every = norm_type, log_every_n_steps
        self.histogram_every = histogram_every_n_steps

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        step = trainer.global_step
        if self.norm_type and step % self.log_every == 0:
            # grad_norm names them grad_<p>_norm/<parameter> and grad_<p>_norm_total.
            norms = grad_norm(pl_module, norm_type=self.norm_type)
            pl_module.log_dict({f"meta_grad/{k}": v for k, v in norms.items()})
        # The algorithm's learned inner rates (LSLR, Meta-SGD), by parameter name.
        algorithm = getattr(pl_module, "algorithm", None)
        rates = algorithm.meta_parameters(detach=True) if algorithm is not None else {}
        if rates and step % self.log_every == 0:
            # LSLR has one rate per tensor and step; Meta-SGD one per entry, logged as the
            # step's mean over the tensor's entries.
            pl_module.log_dict({f"inner_lr/{name}/step_{k}": value
                                for name, steps in rates.items()
                                for k, value in enumerate(
                                    steps.detach().reshape(steps.shape[0], -1).mean(dim=1).tolist())})
        if self._histogram_due(step):
            self._histograms(trainer, pl_module, step)

    def _histogram_due(self, step: int) -> bool:
        if self.histogram_every is None:
            return histogram_due(step)
        return bool(self.histogram_every) and step % self.histogram_every == 0

    def _histograms(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        gradients = {n: p.grad for n, p in pl_module.named_parameters() if p.grad is not None}
        if not gradients:
            return
        histograms = {f"meta_grad/{name}": gradient for name, gradient in gradients.items()}
        histograms.update({f"weight/{name}": p for name, p in pl_module.named_parameters()})
        for logger in trainer.loggers:
            log_histograms(logger, histograms, step)
        everything = torch.cat([g.flatten() for g in gradients.values()])
        record = {"step": step, "bins_log10": LOG10_BINS.tolist(),
                  "meta_grad": log_magnitude_histogram(everything),
                  "per_parameter": {n: log_magnitude_histogram(g) for n, g in gradients.items()},
                  "meta_grad_zero_fraction": float((everything == 0).double().mean()),
                  "meta_grad_nonfinite": int((~torch.isfinite(everything)).sum())}
        self._append(trainer, record)

    @rank_zero_only
    def _append(self, trainer: Trainer, record: dict) -> None:
        folder = run_folder(trainer)  # not trainer.log_dir: a collective, and this is rank 0 only
        if folder is None:
            return
        path = Path(folder) / "histograms.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(record) + "\n")

