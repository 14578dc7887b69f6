"""MAML as a LightningModule: a thin shell over the functional core in :mod:`fewshot.maml`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from fewshot.episode import Episodes
from fewshot.evaluation import format_test_result, mean_and_ci95, summarise_test
from fewshot.inner_optimizers import InnerOptimizerName, make_inner_optimizer
from fewshot.maml import (
    Batching,
    InnerLoop,
    LearningRate,
    QueryMetrics,
    adapt,
    meta_batch_metrics,
    predict,
    resolve_batching,
)
from fewshot.mamlpp import multi_step_loss_weights, use_first_order, use_per_step_batch_norm
from fewshot.models import Conv4, FewShotClassifier
from fewshot.models.per_step_batch_norm import BatchNormMode


class MetaLearner(LightningModule):
    """Meta-train a few-shot classifier with MAML (second order), first-order MAML or MAML++.

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
        batching: ``vmap``, ``loop``, ``threads`` (CPU worker threads) or ``auto`` (by
            device and thread count); see :func:`fewshot.maml.meta_batch_metrics`.
        chunk_size: with vmap, tasks vectorised at a time (bounds the vectorised computation's
            memory); with ``memory_budget_gib``, tasks per recomputed chunk (``auto`` or unset:
            derived from the budget).
        memory_budget_gib: memory the meta-step may use beyond the weights, data and optimizer
            state, in GiB. Tasks then run in chunks that are recomputed in the backward pass, so
            only one chunk's graph is alive at a time; the chunk size comes from two tasks'
            measured peak (CUDA, or the resident set on Linux CPUs). Same gradients, about one
            more forward pass per step. See :mod:`fewshot.memory`.
        checkpoint_inner_steps: keep only each inner step's inputs and run the step again in
            the backward pass: memory per inner step falls from its activations to one copy of
            the parameters (peak nearly flat in ``inner_steps``), at about one more inner step's
            compute each. Same gradients. Combines with ``memory_budget_gib``.

    Mixed precision: the Trainer's ``precision="bf16-mixed"`` (``--trainer.precision
    bf16-mixed``) runs the functional core under bf16 autocast with float32 master weights, on
    CPUs and GPUs; it is opt-in, and float32 (the default) stays exact.

    MAML++ switches (Antoniou et al., 2019; all off gives plain MAML), see :mod:`fewshot.mamlpp`:

    Args:
        multi_step_loss: MSL, the weighted query loss after every inner step.
        multi_step_loss_epochs: epochs over which MSL anneals to the final step alone.
        derivative_order_annealing: DA, first order for the first ``first_order_epochs``.
        first_order_epochs: epochs of first-order training under DA.
        learn_inner_lr: LSLR, one learned inner rate per parameter tensor and inner step,
            initialised to ``inner_lr``; evaluation uses the learned rates (leave
            ``eval_inner_lr`` unset).
        per_step_bn_weights: BNWB, batch-norm weights and biases per inner step.
        batch_norm: ``transductive`` (batch statistics, as MAML) or ``per_step_running`` (BNRS:
            per-step running statistics, used in eval mode; predictions are per image).
        cosine_annealing: CA, cosine decay of ``meta_lr`` to ``min_meta_lr`` over the run's
            ``trainer.max_steps`` optimizer steps.
        min_meta_lr: the floor of the cosine schedule.
        weight_decay: L2 penalty on the meta-parameters (Adam's ``weight_decay``), against
            meta-overfitting.
        nonfinite: what a NaN or Inf in the meta-loss or meta-gradient does: ``stop`` the run
            with an error naming the step (no checkpoint is written after it), or ``skip`` that
            meta-step with a warning (the weights and optimizer state stay as they were).

    Inner optimizers and the algorithm family (see :mod:`fewshot.inner_optimizers`):

    Args:
        inner_optimizer: ``sgd`` (MAML), ``momentum`` or ``adam``: differentiable transforms
            from the support gradient to the direction the inner loop steps along (with
            ``inner_lr``, or learned rates, as the step size).
        inner_momentum: momentum of ``momentum``.
        inner_betas, inner_eps, inner_eps_inside_sqrt: Adam's moment decays and epsilon. The
            defaults (eps 1e-3 inside the square root) keep second-order meta-gradients
            finite; PyTorch's (1e-8, outside) make them explode.
        inner_max_grad_norm: clip each task's inner gradient to this 2-norm (None: off).
        meta_sgd: Meta-SGD (Li et al., 2017): a learned inner rate for every parameter entry
            and inner step, initialised to ``inner_lr`` (LSLR, ``learn_inner_lr``, is its
            per-tensor variant; set one or the other).
        anil: ANIL (Raghu et al., 2020): the inner loop adapts the head only; the body stays
            at its meta-parameters for every task (and is still meta-learned).
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
        chunk_size: int | Literal["auto"] | None = None,
        memory_budget_gib: float | None = None,
        checkpoint_inner_steps: bool = False,
        multi_step_loss: bool = False,
        multi_step_loss_epochs: int = 10,
        derivative_order_annealing: bool = False,
        first_order_epochs: int = 50,
        learn_inner_lr: bool = False,
        per_step_bn_weights: bool = False,
        batch_norm: BatchNormMode = "transductive",
        cosine_annealing: bool = False,
        min_meta_lr: float = 1e-5,
        weight_decay: float = 0.0,
        nonfinite: Literal["stop", "skip"] = "stop",
        inner_optimizer: InnerOptimizerName = "sgd",
        inner_momentum: float = 0.9,
        inner_betas: tuple[float, float] = (0.9, 0.999),
        inner_eps: float = 1e-3,
        inner_eps_inside_sqrt: bool = True,
        inner_max_grad_norm: float | None = None,
        meta_sgd: bool = False,
        anil: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("inner_steps", inner_steps), ("eval_inner_steps", eval_inner_steps)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        for name, value in (("inner_lr", inner_lr), ("eval_inner_lr", eval_inner_lr),
                            ("meta_lr", meta_lr), ("weight_decay", weight_decay)):
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be a non-negative number, got {value}")
        resolve_batching(batching, torch.device("cpu"))  # validates the value early
        if memory_budget_gib is not None and not memory_budget_gib > 0:
            raise ValueError(f"memory_budget_gib must be positive, got {memory_budget_gib}")
        if chunk_size == "auto" and memory_budget_gib is None:
            raise ValueError("chunk_size='auto' derives the chunk from memory_budget_gib: set it")
        if chunk_size is not None and chunk_size != "auto" and not chunk_size >= 1:
            raise ValueError(f"chunk_size must be a positive number of tasks or 'auto', got {chunk_size!r}")
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        optimizer = make_inner_optimizer(inner_optimizer, momentum=inner_momentum,
                                         betas=tuple(inner_betas), eps=inner_eps,
                                         eps_inside_sqrt=inner_eps_inside_sqrt)
        if inner_max_grad_norm is not None and not inner_max_grad_norm > 0:
            raise ValueError(f"inner_max_grad_norm must be > 0 or None, got {inner_max_grad_norm}")
        if meta_sgd and learn_inner_lr:
            raise ValueError("meta_sgd and learn_inner_lr both learn the inner rates: set one "
                             "(meta_sgd: per parameter entry; learn_inner_lr: per tensor)")
        self.save_hyperparameters(ignore=["backbone"])
        if multi_step_loss and inner_steps < 1:
            raise ValueError("multi_step_loss needs inner_steps >= 1")
        self.network = FewShotClassifier(backbone if backbone is not None else Conv4(), ways)
        self.per_step_norms = []
        if per_step_bn_weights or batch_norm != "transductive":
            # Slots 0..inner_steps are the ones training fills; evaluating with more steps
            # reuses the last (PerStepBatchNorm2d.slot clamps), never an untrained slot.
            self.per_step_norms = use_per_step_batch_norm(
                self.network, inner_steps + 1, per_step_bn_weights, batch_norm)
        adapted = self.network.head_parameter_names() if anil else None
        self.inner_loop = InnerLoop(optimizer, inner_max_grad_norm, adapted)
        # LSLR / Meta-SGD: one rate per inner step and tensor / entry, for adapted tensors
        # only. ParameterDict keys may not contain dots.
        self.inner_lrs = nn.ParameterDict({
            name.replace(".", "-"): nn.Parameter(torch.full(
                (max(inner_steps, 1), *(p.shape if meta_sgd else ())), float(inner_lr)))
            for name, p in self.network.named_parameters() if adapted is None or name in adapted
        }) if learn_inner_lr or meta_sgd else None
        self.eval_inner_steps = inner_steps if eval_inner_steps is None else eval_inner_steps
        self.eval_inner_lr = inner_lr if eval_inner_lr is None else eval_inner_lr
        if self.inner_lrs is not None and eval_inner_lr is not None:
            raise ValueError("eval_inner_lr cannot be set with learned inner rates "
                             "(learn_inner_lr or meta_sgd): the learned rates are used")
        self._evaluation_accuracies: list[Tensor] = []
        self._last_step_time: float | None = None
        self.skipped_steps = 0  # meta-steps skipped under nonfinite=skip (logged)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the meta-parameters (unadapted) for ``x: [B, C, H, W]``."""
        return self.network(x)

    def adapt(
        self, support_x: Tensor, support_y: Tensor, steps: int | None = None, lr: float | None = None
    ) -> dict[str, Tensor]:
        """Adapted parameters for one new task, with the evaluation inner loop by default.

        ``support_x: [N*K, C, H, W]``, ``support_y: [N*K]`` with labels ``0..N-1``. Returns a
        detached parameter dict for :meth:`predict_logits`; the module itself is unchanged.
        """
        params = {name: p.detach() for name, p in self.network.named_parameters()}
        with torch.enable_grad():
            adapted = adapt(
                self.network, params, support_x, support_y,
                steps=self.eval_inner_steps if steps is None else steps,
                lr=self._inner_lr(training=False, detach=True) if lr is None else lr,
                first_order=True, inner=self.inner_loop,
            )
        return {name: p.detach() for name, p in adapted.items()}

    def predict_logits(self, params: dict[str, Tensor], x: Tensor, steps_taken: int | None = None) -> Tensor:
        """Logits ``[B, ways]`` of ``x: [B, C, H, W]`` under ``params`` adapted ``steps_taken``
        steps (default: the evaluation steps).

        With transductive batch norm a prediction depends on the other images predicted with
        it; with ``per_step_running`` in eval mode it does not.
        """
        steps = self.eval_inner_steps if steps_taken is None else steps_taken
        with torch.no_grad():
            return predict(self.network, params, x, steps)

    def _inner_lr(self, training: bool, detach: bool = False) -> LearningRate:
        if self.inner_lrs is None:
            return self.hparams.inner_lr if training else self.eval_inner_lr
        rates = {name: self.inner_lrs[name.replace(".", "-")]
                 for name, _ in self.network.named_parameters()
                 if name.replace(".", "-") in self.inner_lrs}
        return {name: r.detach() for name, r in rates.items()} if detach else rates

    def _metrics(self, episodes: Episodes, *, training: bool, first_order: bool = True,
                 every_step: bool = True) -> QueryMetrics:
        params = dict(self.network.named_parameters())
        if not training:  # no meta-gradient needed: adapt from a detached copy
            params = {name: p.detach() for name, p in params.items()}
        return meta_batch_metrics(
            self.network,
            params,
            episodes,
            steps=self.hparams.inner_steps if training else self.eval_inner_steps,
            lr=self._inner_lr(training, detach=not training),
            first_order=first_order,
            every_step=every_step,
            inner=self.inner_loop,
            batching=self.hparams.batching,
            chunk_size=self.hparams.chunk_size,
            memory_budget=(None if self.hparams.memory_budget_gib is None
                           else self.hparams.memory_budget_gib * 2**30),
            checkpoint_inner_steps=self.hparams.checkpoint_inner_steps and training,
        )

    def meta_loss(self, episodes: Episodes, epoch: int) -> tuple[Tensor, QueryMetrics, bool]:
        """The meta-training loss of a meta-batch at ``epoch`` (MAML++ schedules depend on it).

        Returns the loss, the query metrics and whether the step was first order. Pure: the
        running statistics in ``metrics.statistics`` are not applied here.
        """
        hp = self.hparams
        multi_step = hp.multi_step_loss and epoch < hp.multi_step_loss_epochs
        first_order = use_first_order(epoch, hp.first_order, hp.derivative_order_annealing,
                                      hp.first_order_epochs)
        metrics = self._metrics(episodes, training=True, first_order=first_order,
                                every_step=multi_step)
        if multi_step:  # losses after steps 1..K, weighted
            weights = multi_step_loss_weights(hp.inner_steps, epoch, hp.multi_step_loss_epochs)
            return (metrics.losses[:, 1:] * weights.to(metrics.losses)).sum(dim=1).mean(), metrics, first_order
        return metrics.losses[:, -1].mean(), metrics, first_order

    def _nonfinite(self, what: str) -> None:
        message = f"non-finite {what} at meta-iteration {self.global_step}"
        if self.hparams.nonfinite == "stop":
            raise FloatingPointError(message + " (set model.nonfinite=skip to skip such steps)")
        rank_zero_warn(message + ": meta-step skipped")
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        gradients = [p.grad for p in self.parameters() if p.grad is not None]
        if all(torch.isfinite(g).all() for g in gradients):
            return
        self._nonfinite("meta-gradient")
        # Adam leaves parameters without a gradient untouched, moments included.
        for parameter in self.parameters():
            parameter.grad = None

    def training_step(self, episodes: Episodes, batch_idx: int) -> Tensor | None:
        meta_loss, metrics, first_order = self.meta_loss(episodes, self.current_epoch)
        if not torch.isfinite(meta_loss):
            self._nonfinite(f"meta-loss ({meta_loss.item()})")
            return None  # Lightning skips backward and the optimizer step
        statistics = metrics.statistics
        if self.per_step_norms and self.trainer.world_size > 1:
            # Every process holds an equal share of the tasks: the mean over processes is the
            # mean over the whole meta-batch, as in a single process.
            statistics = {k: self.all_gather(v).mean(dim=0) for k, v in statistics.items()}
        for norm in self.per_step_norms:  # running statistics are state: updated here only
            norm.update_running_statistics(statistics)
        tasks = episodes.num_tasks
        self.log("train/loss", meta_loss, prog_bar=True, batch_size=tasks)
        self.log("train/acc", metrics.accuracies[:, -1].mean(), prog_bar=True, batch_size=tasks)
        self.log("train/second_order", float(not first_order), batch_size=tasks)
        inner_norms = {f"train/{k}": v for k, v in metrics.statistics.items()
                       if k.startswith("inner_grad_norm/")}
        self.log_dict(inner_norms, batch_size=tasks)
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
            metrics = self._metrics(episodes, training=False)
        self._evaluation_accuracies.append(metrics.accuracies.detach())
        stage = "test" if self._trainer is not None and self._trainer.testing else "val"
        self.log(f"{stage}/loss", metrics.losses[:, -1].mean(), batch_size=episodes.num_tasks)

    def validation_step(self, episodes: Episodes, batch_idx: int) -> None:
        self._evaluation_step(episodes)

    def test_step(self, episodes: Episodes, batch_idx: int) -> None:
        self._evaluation_step(episodes)

    def _gather_accuracies(self) -> Tensor:
        """This epoch's evaluation accuracies ``[episodes, steps + 1]`` from every process.

        Processes may hold different numbers of episodes (the last evaluation batches go to
        the first ranks), so each pads to the largest share before the all-gather.
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
        self.log("val/acc", mean, prog_bar=True, sync_dist=False)
        self.log("val/acc_ci95", ci95, sync_dist=False)

    def on_test_epoch_end(self) -> None:
        accuracies = self._gather_accuracies()
        shots = self.trainer.datamodule.hparams.shots if self.trainer.datamodule else None
        inner_lr = "learned" if self.inner_lrs is not None else self.eval_inner_lr
        self.test_result = summarise_test(accuracies, self.hparams.ways, shots,
                                       self.eval_inner_steps, inner_lr)
        self.log("test/acc", self.test_result["accuracy"])
        self.log("test/acc_ci95", self.test_result["ci95"])
        if self.trainer.is_global_zero:
            directory = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / "test_results.json"
            path.write_text(json.dumps(self.test_result, indent=2) + "\n")
            print(format_test_result(self.test_result) + f"\nWrote {path}")

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.meta_lr,
                                     weight_decay=self.hparams.weight_decay)
        if not self.hparams.cosine_annealing:
            return optimizer
        total_steps = self.trainer.max_steps
        if total_steps is None or total_steps < 1:
            raise ValueError("cosine_annealing decays over the run: set trainer.max_steps")
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=total_steps, eta_min=self.hparams.min_meta_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
