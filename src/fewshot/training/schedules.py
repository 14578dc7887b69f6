"""Schedules of the meta learning rate that the configs name."""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR


class CosineAnnealing(CosineAnnealingLR):
    """Cosine decay of the meta learning rate to ``eta_min`` over the run (MAML++'s CA).

    Args:
        optimizer: given by the LightningModule.
        eta_min: the floor of the schedule.
        T_max: optimizer steps to decay over; ``None``: the Trainer's ``max_steps``, so the
            length of the run is given once.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, eta_min: float = 1e-5,
                 T_max: int | None = None) -> None:
        self._given_T_max = T_max
        super().__init__(optimizer, T_max=T_max or 1, eta_min=eta_min)

    def fit_to_run(self, max_steps: int | None) -> None:
        """Called by the module with the Trainer's ``max_steps`` when ``T_max`` was not given."""
        if self._given_T_max is not None:
            return
        if max_steps is None or max_steps < 1:
            raise ValueError("cosine annealing decays over the run: set trainer.max_steps "
                             "(or the schedule's T_max)")
        self.T_max = max_steps
