"""Meta-training as a LightningModule: a thin shell over an algorithm and an executor.

The shell owns what Lightning needs (steps, logging, DDP gathering, optimizers) and nothing of
the mathematics: the algorithm (:mod:`fewshot.algorithms`) says what a task computes and what
the meta-loss is, the executor (:mod:`fewshot.execution`) how the tasks of a meta-batch run.
The non-finite policy, throughput and results files are callbacks
(:mod:`fewshot.training.callbacks`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from fewshot.algorithms import MAML, Adapted, Algorithm, build_algorithm
from fewshot.core.episode import Episodes
from fewshot.core.evaluation import mean_and_ci95, summarise_test
from fewshot.core.inner_loop import TaskResult
from fewshot.core.inner_optimizers import SGD, InnerOptimizer, build_inner_optimizer
from fewshot.execution import Auto, Executor, build_executor
from fewshot.models import (
    Conv4,
    FewShotClassifier,
    FewShotRegressor,
    backbone_settings,
    build_backbone,
)
from fewshot.models.per_step_batch_norm import PerStepBatchNorm2d
from fewshot.training.ensemble import ensemble_accuracies


class MetaLearner(LightningModule):
    """Meta-train a few-shot classifier with any algorithm of :mod:`fewshot.algorithms`.

    Each training step runs the algorithm's per-task function on every task of the meta-batch
    (with the executor) and minimises the algorithm's meta-loss with the meta-optimizer.
    Validation and testing adapt with the algorithm's evaluation inner loop and score every
    step; they need gradients, so the Trainer must run with ``inference_mode=False`` (the
    ``fewshot`` CLI sets it).

    Args:
        backbone: feature extractor with an ``out_features`` attribute (default
            :class:`~fewshot.models.Conv4`). Here and for ``algorithm``, ``inner_optimizer``
            and ``executor``, the settings a checkpoint recorded (``{"class_path",
            "init_args"}``) are accepted too: that is how ``load_from_checkpoint`` rebuilds.
        ways: N, classes per task; the linear head has N outputs.
        algorithm: MAML (default), MAML++, Meta-SGD, ANIL, Reptile, ProtoNet, ...
        inner_optimizer: the differentiable inner optimizer (default SGD); see
            :mod:`fewshot.core.inner_optimizers`.
        executor: how a meta-batch's tasks run (default ``Auto``: vmap on GPUs, worker
            threads on multi-core CPUs); see :mod:`fewshot.execution`.
        optimizer: the meta-optimizer (default ``torch.optim.Adam`` with lr 1e-3).
        lr_scheduler: a schedule of the meta learning rate, stepped every meta-iteration
            (MAML++'s cosine annealing: :class:`fewshot.training.schedules.CosineAnnealing`).
        task: ``classification`` (an N-way head, cross-entropy, accuracy) or ``regression``
            (one output per input, mean squared error, reported as MSE: sine waves); the CLI
            sets it from the dataset.

    Mixed precision: the Trainer's ``precision="bf16-mixed"`` runs the tasks under bf16
    autocast with float32 master weights; float32 (the default) stays exact.
    """

    def __init__(
        self,
        backbone: nn.Module | None = None,
        ways: int = 5,
        algorithm: Algorithm | None = None,
        inner_optimizer: InnerOptimizer | None = None,
        executor: Executor | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        task: Literal["classification", "regression"] = "classification",
    ) -> None:
        super().__init__()
        if task not in ("classification", "regression"):
            raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
        self.regression = task == "regression"
        backbone = Conv4() if backbone is None else backbone
        backbone = build_backbone(backbone) if isinstance(backbone, (dict, str)) else backbone
        # Objects as injected, or the settings a checkpoint recorded (load_from_checkpoint).
        self.algorithm: Algorithm = _built(algorithm, build_algorithm, MAML)
        self.inner_optimizer: InnerOptimizer = _built(inner_optimizer, build_inner_optimizer, SGD)
        self.executor: Executor = _built(executor, build_executor, Auto)
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        # What a checkpoint needs to rebuild this module: plain settings, never objects.
        self.save_hyperparameters({
            "backbone": _backbone_record(backbone), "ways": ways,
            "algorithm": self.algorithm.settings(),
            "inner_optimizer": self.inner_optimizer.settings(),
            "executor": self.executor.settings(),
            # Recorded for regression only: classification checkpoints stay as they were.
            **({"task": task} if self.regression else {}),
        })
        self.network = FewShotRegressor(backbone) if self.regression else FewShotClassifier(backbone, ways)
        self.algorithm.build(self.network, self.inner_optimizer)
        self._evaluation_accuracies: list[Tensor] = []  # this epoch's, until gathered
        # Test-time checkpoint ensemble (fewshot.training.ensemble): other MetaLearners whose
        # averaged probabilities are scored instead of this one's; a plain list, so that they
        # are neither parameters nor in this module's checkpoints.
        self.ensemble: list[MetaLearner] = []

    # -- the per-step work -------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the meta-parameters (unadapted) for ``x: [B, C, H, W]``."""
        return self.network(x)

    def run_tasks(self, episodes: Episodes, training: bool) -> TaskResult:
        """The per-task results of a meta-batch, stacked ``[T, ...]``."""
        params = dict(self.network.named_parameters())
        own = self.algorithm.meta_parameters(detach=not training)
        if training:
            task = self.algorithm.training_tasks(self.current_epoch,
                                                 self.executor.checkpoint_inner_steps)
        else:  # no meta-gradient needed: adapt from a detached copy
            params = {name: p.detach() for name, p in params.items()}
            task = self.algorithm.evaluation_tasks()
        return self.executor.run(task, self.network, (params, own), episodes)

    def meta_loss(self, episodes: Episodes, epoch: int | None = None) -> tuple[Tensor, TaskResult]:
        """The meta-training loss of a meta-batch and the per-task results behind it."""
        results = self.run_tasks(episodes, training=True)
        return self.algorithm.meta_loss(results, self.current_epoch if epoch is None else epoch), results

    def training_step(self, episodes: Episodes, batch_idx: int) -> Tensor:
        meta_loss, results = self.meta_loss(episodes)
        self._update_running_statistics(results.batch_norm_statistics)
        tasks = episodes.num_tasks
        meta_loss = meta_loss * self._share_weight(tasks)
        self.log("train/loss", results.losses[:, -1].mean(), prog_bar=True, batch_size=tasks)
        if not self.regression:  # accuracy means nothing there; train/loss is the MSE
            self.log("train/acc", results.accuracies[:, -1].mean(), prog_bar=True, batch_size=tasks)
        self.log("train/second_order",
                 float(not self.algorithm.first_order_at(self.current_epoch)), batch_size=tasks)
        self.log_dict({f"train/{k}": v.mean() for k, v in results.diagnostics.items()},
                      batch_size=tasks)
        return meta_loss

    def _share_weight(self, tasks: int) -> float:
        """The weight of this process's meta-loss (a mean over its own tasks) under DDP.

        DDP averages the processes' gradients with equal weights; when the meta-batch does not
        divide evenly (3 tasks on 2 processes: 2 and 1), weighting each process's mean by
        ``its tasks x processes / all tasks`` makes that average the mean over all tasks, i.e.
        the single-process meta-gradient.
        """
        world_size = self.trainer.world_size if self._trainer is not None else 1
        if world_size == 1:
            return 1.0
        total = self.trainer.strategy.reduce(
            torch.tensor(float(tasks), device=self.device), reduce_op="sum")
        return tasks * world_size / float(total)

    def _update_running_statistics(self, statistics: dict[str, Tensor]) -> None:
        """Per-step running batch norm (MAML++ BNRS): state, updated here and nowhere else."""
        layers = [m for m in self.network.modules() if isinstance(m, PerStepBatchNorm2d)]
        if not layers or not statistics:
            return
        # Tasks may be split unevenly over processes: weight each process's mean by its tasks.
        tasks = next(iter(statistics.values())).shape[0]
        means = {k: v.mean(dim=0) for k, v in statistics.items()}
        if self.trainer.world_size > 1:
            counts = self.all_gather(torch.tensor(float(tasks), device=self.device))
            means = {k: (self.all_gather(v) * counts.view(-1, *[1] * v.dim())).sum(0) / counts.sum()
                     for k, v in means.items()}
        for layer in layers:
            layer.update_running_statistics(means)

    def _evaluation_step(self, episodes: Episodes) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "MAML adapts with gradients at validation and test time, which inference mode "
                "forbids: create the Trainer with inference_mode=False (the fewshot CLI does)."
            )
        stage = "test" if self._trainer is not None and self._trainer.testing else "val"
        if stage == "test" and self.ensemble:
            self._evaluation_accuracies.append(ensemble_accuracies(self.ensemble, episodes))
            return
        with torch.enable_grad():
            results = self.run_tasks(episodes, training=False)
        # Regression is scored by the query MSE after each step, the query loss.
        self._evaluation_accuracies.append(
            (results.losses if self.regression else results.accuracies).detach())
        self.log(f"{stage}/loss", results.losses[:, -1].mean(), batch_size=episodes.num_tasks,
                 sync_dist=True)

    def validation_step(self, episodes: Episodes, batch_idx: int) -> None:
        self._evaluation_step(episodes)

    def test_step(self, episodes: Episodes, batch_idx: int) -> None:
        self._evaluation_step(episodes)

    def _gather_accuracies(self) -> Tensor:
        """This epoch's evaluation accuracies ``[episodes, steps + 1]`` from every process.

        Processes may hold different numbers of episodes, so each pads to the largest share
        before the all-gather.
        """
        accuracies = torch.cat(self._evaluation_accuracies)
        self._evaluation_accuracies.clear()
        if self.trainer.world_size > 1:
            counts = self.all_gather(torch.tensor(accuracies.shape[0], device=accuracies.device))
            padded = accuracies.new_zeros(int(counts.max()), accuracies.shape[1])
            padded[: accuracies.shape[0]] = accuracies
            gathered = self.all_gather(padded)
            accuracies = torch.cat([gathered[r, : int(n)] for r, n in enumerate(counts)])
        return accuracies.cpu()

    def setup(self, stage: str) -> None:
        # Lightning's sync_batchnorm would average batch statistics over the processes, that is
        # over tasks: every task must be normalised by its own batch. fewshot's batch-norm layers
        # are not torch's, so Lightning would skip them silently; refuse it loudly instead.
        connector = getattr(self.trainer, "_accelerator_connector", None)
        layer_sync = getattr(connector, "_layer_sync", None)
        if (layer_sync or getattr(self.trainer.strategy, "_layer_sync", None)) is not None:
            raise ValueError(
                "sync_batchnorm is not supported: MAML normalises each task with its own batch "
                "statistics, and synchronising them across processes would mix tasks together. "
                "Drop --trainer.sync_batchnorm.")

    def on_validation_epoch_end(self) -> None:
        if not self._evaluation_accuracies:
            return
        accuracies = self._gather_accuracies()
        mean, ci95 = mean_and_ci95(accuracies[:, -1])
        # Every process holds the same gathered figures: the reduction changes nothing, it
        # only tells Lightning so.
        metric = "mse" if self.regression else "acc"
        self.log(f"val/{metric}", mean, prog_bar=True, sync_dist=True)
        self.log(f"val/{metric}_ci95", ci95, sync_dist=True)

    def on_test_start(self) -> None:
        # Ensemble members were loaded before Lightning moved this module to its device.
        for member in self.ensemble:
            member.to(self.device)

    def on_test_epoch_end(self) -> None:
        accuracies = self._gather_accuracies()
        datamodule = self.trainer.datamodule
        shots = datamodule.hparams.shots if datamodule is not None else None
        inner_lr = "learned" if self.algorithm.meta_parameters() else self.algorithm.evaluation_lr
        # The results file is written by fewshot.training.callbacks.TestResultsWriter.
        metric = "mse" if self.regression else "accuracy"
        self.test_result = summarise_test(accuracies, self.hparams.ways, shots,
                                          self.algorithm.evaluation_steps, inner_lr, metric)
        self.test_result["algorithm"] = self.algorithm.describe()
        if self.ensemble:
            self.test_result["ensemble"] = [getattr(m, "source", {}) for m in self.ensemble]
        short = "mse" if self.regression else "acc"
        self.log(f"test/{short}", self.test_result[metric], sync_dist=True)
        self.log(f"test/{short}_ci95", self.test_result["ci95"], sync_dist=True)

    def configure_optimizers(self):
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        schedule = self.lr_scheduler(optimizer)
        fit_to_run = getattr(schedule, "fit_to_run", None)
        if fit_to_run is not None:
            fit_to_run(self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # -- using the trained model (the inference package does the same without Lightning) -----

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None,
              lr: float | None = None) -> Adapted:
        """The model adapted to one new task (``support_y`` in ``0..N-1``)."""
        return self.algorithm.adapt(self.network, dict(self.network.named_parameters()),
                                    support_x, support_y, steps, lr)

    def predict_logits(self, adapted: Adapted, x: Tensor) -> Tensor:
        """Logits ``[B, N]`` of ``x: [B, C, H, W]`` for the task ``adapted`` was adapted to."""
        return self.algorithm.predict(self.network, adapted, x)


def _built(value: Any, build: Any, default: type) -> Any:
    if value is None:
        return default()
    return build(value) if isinstance(value, (dict, str)) else value


def _backbone_record(backbone: nn.Module) -> dict[str, Any] | str:
    """The backbone's settings for the checkpoint, or its class path alone (with a warning at
    load time) when it cannot describe itself."""
    try:
        return backbone_settings(backbone)
    except ValueError as error:
        rank_zero_warn(f"{error}; checkpoints will name the class only, and loading one needs "
                       "the backbone passed again: MetaLearner.load_from_checkpoint(path, backbone=...)")
        cls = type(backbone)
        return f"{cls.__module__}.{cls.__qualname__}"
