"""ANIL (Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse?", ICLR 2020):
MAML whose inner loop adapts the head only."""

from __future__ import annotations

from torch import nn

from fewshot.algorithms.maml import MAML


class ANIL(MAML):
    """Almost No Inner Loop: the inner loop adapts the linear head; the feature extractor stays
    at its meta-parameters for every task (and is still meta-learned through the head's
    adaptation). Much cheaper per step than MAML.

    Arguments as :class:`~fewshot.algorithms.maml.MAML`; ``learned_rates="per_entry"`` gives
    ANIL with Meta-SGD rates for the head.
    """

    def adapted_parameters(self, network: nn.Module) -> frozenset[str]:
        head = getattr(network, "head_parameter_names", None)
        if head is None:
            raise ValueError("ANIL adapts the head only: the network needs head_parameter_names() "
                             "(fewshot.models.FewShotClassifier has it)")
        return head()
