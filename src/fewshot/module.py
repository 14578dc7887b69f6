"""MAML as a LightningModule: a thin shell over the functional core in :mod:`fewshot.maml`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from lightning.pytorch import LightningModule
from torch import Tensor, nn

from fewshot.episode import Episodes
from fewshot.evaluation import mean_and_ci95, summarise_per_step
from fewshot.maml import Batching, meta_batch_metrics, resolve_batching
from fewshot.models import Conv4, FewShotClassifier


class MetaLearner(LightningModule):
    """Meta-train a few-shot classifier with MAML (second order) or first-order MAML.

    Each training step adapts the network to every task of the meta-batch with ``inner_steps``
    SGD steps on the support set and minimises the mean query loss of the adapted networks with
    Adam (automatic optimisation). Validation and testing adapt with ``eval_inner_steps`` and
    score every step; they need gradients, so the Trainer must run with ``inference_mode=False``
    (the ``fewshot`` CLI sets it).

    Args:
        backbone: feature extractor with an ``out_features`` attribute (e.g. :class:`Conv4`).
        ways: N, classes per task; the linear head has N outputs.
        inner_steps: adaptation steps during meta-training.
        inner_lr: adaptation learning rate during meta-training.
        eval_inner_steps: adaptation steps at validation/test (default: ``inner_steps``).
        eval_inner_lr: adaptation learning rate at validation/test (default: ``inner_lr``).
        first_order: first-order MAML (inner gradients treated as constants).
        meta_lr: Adam learning rate of the meta-parameters.
        batching: ``vmap``, ``loop`` or ``auto`` (by device); see :mod:`fewshot.maml`.
        chunk_size: with vmap, tasks vectorised at a time (bounds memory).
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        ways: int = 5,
        inner_steps: int = 1,
        inner_lr: float = 0.4,
        eval_inner_steps: int | None = None,
        eval_inner_lr: float | None = None,
        first_order: bool = False,
        meta_lr: float = 1e-3,
        batching: Batching = "auto",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("inner_steps", inner_steps), ("eval_inner_steps", eval_inner_steps)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, value in (("inner_lr", inner_lr), ("eval_inner_lr", eval_inner_lr), ("meta_lr", meta_lr)):
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be a non-negative number, got {value}")
        resolve_batching(batching, torch.device("cpu"))  # validates the value early
        self.save_hyperparameters(ignore=["backbone"])
        self.network = FewShotClassifier(backbone if backbone is not None else Conv4(), ways)
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.eval_inner_lr = inner_lr if eval_inner_lr is None else eval_inner_lr
        self._evaluation_accuracies: list[Tensor] = []
        self._last_step_time: float | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the meta-parameters (unadapted) for ``x: [B, C, H, W]``."""
        return self.network(x)

    def _metrics(self, episodes: Episodes, *, training: bool) -> tuple[Tensor, Tensor]:
        hp = self.hparams
        params = dict(self.network.named_parameters())
        if not training:  # no meta-gradient needed: adapt from a detached copy
            params = {name: p.detach() for name, p in params.items()}
        return meta_batch_metrics(
            self.network,
            params,
            episodes,
            steps=hp.inner_steps if training else self.eval_inner_steps,
            lr=hp.inner_lr if training else self.eval_inner_lr,
            first_order=hp.first_order or not training,
            every_step=not training,
            batching=hp.batching,
            chunk_size=hp.chunk_size,
        )

    def training_step(self, episodes: Episodes, batch_idx: int) -> Tensor:
        losses, accuracies = self._metrics(episodes, training=True)
        meta_loss = losses[:, -1].mean()
        tasks = episodes.num_tasks
        self.log("train/loss", meta_loss, prog_bar=True, batch_size=tasks)
        self.log("train/acc", accuracies[:, -1].mean(), prog_bar=True, batch_size=tasks)
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log("train/tasks_per_s", tasks / (now - self._last_step_time), prog_bar=True)
        self._last_step_time = now
        return meta_loss

    def on_train_epoch_start(self) -> None:
        self._last_step_time = None  # validation in between would distort the rate

    def _evaluation_step(self, episodes: Episodes) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "MAML adapts with gradients at validation and test time, which inference mode "
                "forbids: create the Trainer with inference_mode=False (the fewshot CLI does)."
            )
        with torch.enable_grad():
            _, accuracies = self._metrics(episodes, training=False)
        self._evaluation_accuracies.append(accuracies.detach())

    def validation_step(self, episodes: Episodes, batch_idx: int) -> None:
        self._evaluation_step(episodes)

    def test_step(self, episodes: Episodes, batch_idx: int) -> None:
        self._evaluation_step(episodes)

    def _gather_accuracies(self) -> Tensor:
        accuracies = torch.cat(self._evaluation_accuracies)
        self._evaluation_accuracies.clear()
        if self.trainer.world_size > 1:
            accuracies = self.all_gather(accuracies).flatten(0, 1)
        return accuracies.cpu()

    def on_validation_epoch_end(self) -> None:
        if not self._evaluation_accuracies:
            return
        accuracies = self._gather_accuracies()
        mean, ci95 = mean_and_ci95(accuracies[:, -1])
        self.log("val/acc", mean, prog_bar=True, sync_dist=False)
        self.log("val/acc_ci95", ci95, sync_dist=False)

    def on_test_epoch_end(self) -> None:
        accuracies = self._gather_accuracies()
        rows = summarise_per_step(accuracies)
        final = rows[-1]
        self.log("test/acc", final["accuracy"])
        self.log("test/acc_ci95", final["ci95"])
        result = {
            "episodes": accuracies.shape[0],
            "ways": self.hparams.ways,
            "inner_steps": self.eval_inner_steps,
            "inner_lr": self.eval_inner_lr,
            "accuracy": final["accuracy"],
            "ci95": final["ci95"],
            "per_step": rows,
        }
        self.test_result = result
        lines = [f"  after {r['inner_step']} step(s): {100 * r['accuracy']:.2f} +- {100 * r['ci95']:.2f}%" for r in rows]
        if self.trainer.is_global_zero:
            directory = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / "test_results.json"
            path.write_text(json.dumps(result, indent=2) + "\n")
            print(
                f"Test accuracy over {result['episodes']} episodes ({self.hparams.ways}-way "
                f"{self.trainer.datamodule.hparams.shots if self.trainer.datamodule else '?'}-shot, "
                "mean +- 95% CI):\n" + "\n".join(lines) + f"\nWrote {path}"
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.meta_lr)
