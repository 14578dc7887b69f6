"""The four-block convolutional network of MAML (Finn et al., 2017)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from fewshot.models.batch_norm import TransductiveBatchNorm2d

NormLayer = Callable[[int], nn.Module]


class Conv4(nn.Module):
    """Feature extractor: 4 x [conv 3x3, batch norm, max-pool 2x2, ReLU], then flatten.

    MAML's block is conv, batch norm, ReLU, max-pool; max-pool and ReLU commute (both are
    monotone, ``max(relu(a), relu(b)) = relu(max(a, b))``), so pooling first computes the same
    function and, where the maximum is not tied, the same derivatives of every order, with the
    ReLU and its derivatives on a quarter of the values (second-order meta-step on Omniglot, one
    CPU thread: MAML's order takes 2-9% longer, ``python benchmarks/loop_ablation.py``). State
    dicts are unchanged (neither layer has parameters).

    64 filters for Omniglot and 32 for mini-ImageNet reproduce MAML; MAML++ uses 48 (64 on
    Omniglot). A 28x28 input leaves a 1x1 map (64 features), an 84x84 input a 5x5 map.

    Args:
        in_channels: image channels (1 for Omniglot, 3 for RGB datasets).
        hidden_channels: filters in every convolution.
        image_size: side of the square input, needed to size the head.
        norm_layer: builds the normalisation of each block from its channel count; the default
            uses the task's batch statistics (transductive, as MAML).

    Example:
        >>> features = Conv4(in_channels=1, hidden_channels=64, image_size=28)
        >>> features.out_features
        64
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden_channels: int = 64,
        image_size: int = 28,
        norm_layer: NormLayer = TransductiveBatchNorm2d,
    ) -> None:
        super().__init__()
        if min(in_channels, hidden_channels, image_size) < 1:
            raise ValueError(
                f"Conv4 needs positive sizes, got in_channels={in_channels}, "
                f"hidden_channels={hidden_channels}, image_size={image_size}"
            )
        # Kept so the backbone can be described and rebuilt (fewshot.models.registry).
        self.in_channels, self.hidden_channels, self.image_size = in_channels, hidden_channels, image_size
        self.norm_layer = norm_layer
        blocks = []
        channels, side = in_channels, image_size
        for _ in range(4):
            blocks += [
                nn.Conv2d(channels, hidden_channels, kernel_size=3, padding=1),
                norm_layer(hidden_channels),
                nn.MaxPool2d(2),
                nn.ReLU(),
            ]
            channels, side = hidden_channels, side // 2
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for 4 max-pools (need >= 16)")
        self.blocks = nn.Sequential(*blocks, nn.Flatten())
        self.out_features = hidden_channels * side * side
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x: [batch, in_channels, image_size, image_size] -> [batch, out_features]``."""
        return self.blocks(x)
