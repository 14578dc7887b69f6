"""Meta-SGD (Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning",
2017): MAML whose inner learning rate is learned for every parameter entry and inner step."""

from __future__ import annotations

from fewshot.algorithms.maml import MAML, LearnedRates


class MetaSGD(MAML):
    """MAML with a learned rate per parameter entry and inner step, initialised to ``inner_lr``
    (direction and size of every inner update are meta-learned).

    Arguments as :class:`~fewshot.algorithms.maml.MAML`; ``learned_rates`` defaults to
    ``per_entry`` (``per_tensor`` gives MAML++'s LSLR instead).
    """

    def __init__(
        self,
        inner_steps: int = 1,
        inner_lr: float = 0.4,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        learned_rates: LearnedRates = "per_entry",
        inner_max_grad_norm: float | None = None,
    ) -> None:
        super().__init__(inner_steps, inner_lr, eval_inner_steps, None, first_order,
                         learned_rates, inner_max_grad_norm)
