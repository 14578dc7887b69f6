"""MAML and first-order MAML (Finn, Abbeel & Levine, ICML 2017), and the base of its family.

Meta-training adapts the network to every task with ``inner_steps`` differentiable updates on
the support set and minimises the adapted networks' query loss; the meta-gradient flows through
the inner updates (second order) unless ``first_order``. Variants change one part each, as
subclasses: which parameters adapt (ANIL), how the rates are learned (Meta-SGD, LSLR), how the
per-step losses are weighted and when to go first order (MAML++), what the meta-gradient is
(Reptile).
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.algorithms.base import Adapted, Algorithm, Params, TaskFunction
from fewshot.core.inner_loop import (
    InnerLoop,
    LearningRate,
    Loss,
    adapt,
    inner_update,
    predict,
    task_query_metrics,
)
from fewshot.core.inner_optimizers import InnerOptimizer

# ``none``: the fixed ``inner_lr``; ``per_tensor``: one learned rate per parameter tensor and
# inner step (MAML++'s LSLR); ``per_entry``: one per parameter entry and step (Meta-SGD).
LearnedRates = Literal["none", "per_tensor", "per_entry"]


class MAML(Algorithm):
    """Model-Agnostic Meta-Learning, second order, or first order with ``first_order``.

    Args:
        inner_steps: adaptation steps during meta-training.
        inner_lr: adaptation learning rate (the initial value of learned rates).
        eval_inner_steps: adaptation steps at validation, test and adaptation (default:
            ``inner_steps``).
        eval_inner_lr: adaptation learning rate there (default: ``inner_lr``; not with
            learned rates, which are used instead).
        first_order: FOMAML, the inner gradients treated as constants.
        learned_rates: ``none``, ``per_tensor`` (LSLR) or ``per_entry`` (Meta-SGD), learned
            for the adapted parameters only, one set per inner step.
        inner_max_grad_norm: clip each task's inner gradient to this 2-norm (None: off).
        zero_head: the zeroing trick (Kao, Chiu & Chen, "MAML is a Noisy Contrastive Learner
            in Classification", ICLR 2022): every task starts from a zero head weight instead
            of a meta-learned one, so the first inner step turns the head into a
            prototype-like classifier of the support features. The first step then has no
            gradient for the layers before the head and computes none (exact, and cheaper:
            with one inner step the body is not adapted at all). The head's stored weight
            is unused.

    Example:
        >>> import torch
        >>> from fewshot.core import Episodes
        >>> from fewshot.models import Conv4, FewShotClassifier
        >>> network = FewShotClassifier(Conv4(1, 8, 28), ways=5)
        >>> maml = MAML(inner_steps=1, inner_lr=0.4)
        >>> maml.build(network)
        >>> task = (torch.rand(5, 1, 28, 28), torch.arange(5), torch.rand(10, 1, 28, 28),
        ...         torch.arange(5).repeat(2))
        >>> result = maml.training_tasks(epoch=0)(network, (dict(network.named_parameters()), {}), task)
        >>> result.objective.backward()  # second-order meta-gradient in .grad
    """

    def __init__(
        self,
        inner_steps: int = 1,
        inner_lr: float = 0.4,
        eval_inner_steps: int | None = None,
        eval_inner_lr: float | None = None,
        first_order: bool = False,
        learned_rates: LearnedRates = "none",
        inner_max_grad_norm: float | None = None,
        zero_head: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("inner_steps", inner_steps), ("eval_inner_steps", eval_inner_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name, value in (("inner_lr", inner_lr), ("eval_inner_lr", eval_inner_lr)):
            if value is not None and not value >= 0:
                raise ValueError(f"{name} must be a non-negative number, got {value}")
        if learned_rates not in ("none", "per_tensor", "per_entry"):
            raise ValueError(f"learned_rates must be 'none', 'per_tensor' or 'per_entry', got {learned_rates!r}")
        if learned_rates != "none" and eval_inner_lr is not None:
            raise ValueError("eval_inner_lr cannot be set with learned inner rates: the learned "
                             "rates are used")
        if inner_max_grad_norm is not None and not inner_max_grad_norm > 0:
            raise ValueError(f"inner_max_grad_norm must be > 0 or None, got {inner_max_grad_norm}")
        self.inner_steps, self.inner_lr = inner_steps, float(inner_lr)
        self.eval_inner_steps, self.eval_inner_lr = eval_inner_steps, eval_inner_lr
        self.first_order, self.learned_rates = bool(first_order), learned_rates
        self.zero_head = bool(zero_head)
        self._zeroed: frozenset[str] = frozenset()
        self._first_step_adapts: frozenset[str] | None = None
        self.inner_max_grad_norm = inner_max_grad_norm
        self._adapted: frozenset[str] | None = None
        self._loss: Loss = F.cross_entropy
        # Learned rates by parameter name; ParameterDict keys may not contain dots.
        self.inner_lrs = nn.ParameterDict()

    # -- the parts subclasses change ---------------------------------------------------------

    def adapted_parameters(self, network: nn.Module) -> frozenset[str] | None:
        """Names of the parameters the inner loop adapts (``None``: all of them)."""
        return None

    def build(self, network: nn.Module, inner_optimizer: InnerOptimizer | None = None) -> None:
        super().build(network, inner_optimizer)
        self._adapted = self.adapted_parameters(network)
        # The network says how its outputs are scored: a regressor (fewshot.models.
        # FewShotRegressor) by mean squared error, a classifier by cross-entropy.
        self._loss = getattr(network, "task_loss", F.cross_entropy)
        if self.zero_head:
            head = getattr(network, "head_parameter_names", None)
            weight = "head.weight"
            if head is None or weight not in head():
                raise ValueError("zero_head starts every task from a zero linear head: the "
                                 "network needs a head.weight in head_parameter_names() "
                                 "(fewshot.models.FewShotClassifier has it)")
            self._zeroed, self._first_step_adapts = frozenset({weight}), head()
        if self.learned_rates == "none":
            return
        for name, p in network.named_parameters():
            if self._adapted is None or name in self._adapted:
                shape = p.shape if self.learned_rates == "per_entry" else ()
                self.inner_lrs[name.replace(".", "-")] = nn.Parameter(
                    torch.full((max(self.inner_steps, 1), *shape), self.inner_lr,
                               dtype=p.dtype, device=p.device))

    def first_order_at(self, epoch: int) -> bool:
        return self.first_order

    def every_step_at(self, epoch: int) -> bool:
        """Whether meta-training at ``epoch`` scores the query set after every inner step."""
        return False

    # -- what the executors run ------------------------------------------------------------

    @property
    def evaluation_steps(self) -> int:
        return self.inner_steps if self.eval_inner_steps is None else self.eval_inner_steps

    @property
    def evaluation_lr(self) -> float | None:
        if self.learned_rates != "none":
            return None
        return self.inner_lr if self.eval_inner_lr is None else self.eval_inner_lr

    def meta_parameters(self, detach: bool = False) -> Params:
        rates = {name.replace("-", "."): rate for name, rate in self.inner_lrs.items()}
        return {n: r.detach() for n, r in rates.items()} if detach else rates

    def inner_loop(self) -> InnerLoop:
        return InnerLoop(self.inner_optimizer, self.inner_max_grad_norm, self._adapted, self._loss,
                         self._zeroed, self._first_step_adapts)

    def _rates(self, own: Params, training: bool) -> LearningRate:
        if self.learned_rates != "none":
            return own
        return self.inner_lr if training else self.evaluation_lr

    def training_tasks(self, epoch: int, checkpoint_inner_steps: bool = False) -> TaskFunction:
        return partial(self._task, steps=self.inner_steps, training=True,
                       first_order=self.first_order_at(epoch), every_step=self.every_step_at(epoch),
                       checkpoint_inner_steps=checkpoint_inner_steps)

    def evaluation_tasks(self) -> TaskFunction:
        return partial(self._task, steps=self.evaluation_steps, training=False, first_order=True,
                       every_step=True, checkpoint_inner_steps=False)

    def _task(self, model: nn.Module, differentiable: tuple[Params, Params], task, *, steps: int,
              training: bool, first_order: bool, every_step: bool, checkpoint_inner_steps: bool):
        params, own = differentiable
        return task_query_metrics(model, params, *task, steps=steps, lr=self._rates(own, training),
                                  first_order=first_order, every_step=every_step,
                                  inner=self.inner_loop(),
                                  checkpoint_inner_steps=checkpoint_inner_steps)

    # -- using a trained model -----------------------------------------------------------------

    def adapt(self, network: nn.Module, params: Params, support_x: Tensor, support_y: Tensor,
              steps: int | None = None, lr: float | None = None) -> Adapted:
        steps = self.evaluation_steps if steps is None else steps
        rate = self._rates(self.meta_parameters(detach=True), training=False) if lr is None else lr
        with torch.enable_grad():
            adapted = adapt(network, {n: p.detach() for n, p in params.items()}, support_x,
                            support_y, steps=steps, lr=rate, first_order=True,
                            inner=self.inner_loop())
        return Adapted({n: p.detach() for n, p in adapted.items()}, steps)

    def predict(self, network: nn.Module, adapted: Adapted, x: Tensor) -> Tensor:
        with torch.no_grad():
            return predict(network, adapted.params, x, adapted.steps_taken)

    def step_probabilities(self, network: nn.Module, params: Params, support_x: Tensor,
                           support_y: Tensor, query_x: Tensor) -> Tensor:
        # The updates of evaluation (first order, the evaluation rates), each taken once.
        rate = self._rates(self.meta_parameters(detach=True), training=False)
        inner = self.inner_loop()
        params, state, rows = inner.starting_point({n: p.detach() for n, p in params.items()}), None, []
        for step in range(self.evaluation_steps + 1):
            with torch.no_grad():
                rows.append(predict(network, params, query_x, step).softmax(dim=-1))
            if step == self.evaluation_steps:
                break
            with torch.enable_grad():
                params, state, _, _ = inner_update(network, params, support_x, support_y, rate,
                                                   True, step, inner, state)
            params = {n: p.detach() for n, p in params.items()}
        return torch.stack(rows)
