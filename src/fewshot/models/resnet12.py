"""ResNet-12, the residual backbone of few-shot learning since TADAM and MetaOptNet.

Four residual blocks of 64, 160, 320 and 640 channels (Oreshkin et al., "TADAM", NeurIPS 2018;
Lee et al., "Meta-Learning with Differentiable Convex Optimization", CVPR 2019; learn2learn's
``ResNet12``). Each block is 3 x [conv 3x3, batch norm, leaky ReLU 0.1] whose last activation
comes after adding a 1x1-conv + batch-norm shortcut, then a 2x2 max-pool; an 84x84 image
leaves a 5x5x640 map, globally average-pooled to 640 features.

DropBlock and dropout, which those papers add against overfitting, are omitted: the network is
deterministic, so the functional core can ``vmap`` it over tasks and the meta-gradient is
reproducible. Every normalisation comes from ``norm_layer`` (batch statistics by default, as
MAML), so :func:`fewshot.mamlpp.use_per_step_batch_norm` swaps all 16 of them, shortcut ones
included.

What fits: a second-order meta-step keeps the graph of every inner step, so its memory grows
with support images x inner steps, on top of the query forward pass. GiB a 5-way meta-step of
one task needs (15 queries per class, 84x84, float32, default channels; peak resident memory
on CPU above what the process held before, torch 2.13, vmap batching;
``python benchmarks/resnet12_memory.py --max_gib 15``):

    =====  ===========  ===========  ============
    shots  inner steps  first order  second order
    =====  ===========  ===========  ============
    1      1            4.7          5.2
    1      5            4.8          8.0
    5      1            4.8          7.7
    5      5            5.0          ~21 (over the 15 GiB cap; extrapolated)
    =====  ===========  ===========  ============

The 75 query images take about 4.6 GiB; each support image x inner step adds about 0.13 GiB at
second order. A meta-batch multiplies this by its tasks; ``MetaLearner(chunk_size=...)`` (tasks
vectorised at a time) bounds it, with the same gradient.
"""

from __future__ import annotations

from torch import Tensor, nn

from fewshot.models.batch_norm import TransductiveBatchNorm2d
from fewshot.models.conv4 import NormLayer

STANDARD_CHANNELS = (64, 160, 320, 640)


class ResidualBlock(nn.Module):
    """3 x [conv 3x3, norm, leaky ReLU], the last activation after the shortcut; max-pool 2x2.

    ``x: [B, in_channels, H, W] -> [B, out_channels, H // 2, W // 2]``.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = norm_layer(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = norm_layer(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm3 = norm_layer(out_channels)
        # Always a projection, even when the channels match: the standard definition.
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), norm_layer(out_channels))
        self.activation = nn.LeakyReLU(0.1)  # not in place: autograd of every order needs inputs
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.activation(self.norm1(self.conv1(x)))
        out = self.activation(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.pool(self.activation(out + self.shortcut(x)))


class ResNet12(nn.Module):
    """Feature extractor: 4 residual blocks, then global average pooling (or flatten).

    With the standard channels and 3 input channels it has 12,424,320 parameters (convolutions
    without bias, batch-norm weights and biases). Same interface as :class:`~fewshot.models.Conv4`.

    Args:
        in_channels: image channels (1 for Omniglot, 3 for RGB datasets).
        channels: output channels of the four blocks.
        image_size: side of the square input (>= 16 for four max-pools); sizes the head when
            ``avg_pool`` is off.
        norm_layer: builds each normalisation from its channel count; the default uses the
            task's batch statistics (transductive, as MAML).
        avg_pool: average the last map over space (``channels[-1]`` features); otherwise
            flatten it (``channels[-1] * side * side``, 16,000 at 84x84).

    Example:
        >>> import torch
        >>> features = ResNet12(in_channels=3, image_size=84)
        >>> features.out_features
        640
        >>> tuple(ResNet12(3, (4, 8, 8, 16), image_size=16)(torch.rand(2, 3, 16, 16)).shape)
        (2, 16)
    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: tuple[int, int, int, int] = STANDARD_CHANNELS,
        image_size: int = 84,
        norm_layer: NormLayer = TransductiveBatchNorm2d,
        avg_pool: bool = True,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        if len(channels) != 4 or min(in_channels, image_size, *channels) < 1:
            raise ValueError(
                f"ResNet12 needs 4 positive block widths and positive sizes, got "
                f"in_channels={in_channels}, channels={channels}, image_size={image_size}"
            )
        side = image_size // 16
        if side < 1:
            raise ValueError(f"image_size={image_size} is too small for 4 max-pools (need >= 16)")
        # Kept so the backbone can be described and rebuilt (fewshot.models.registry).
        self.in_channels, self.channels, self.image_size = in_channels, channels, image_size
        self.norm_layer = norm_layer
        widths = (in_channels, *channels)
        self.blocks = nn.Sequential(*(
            ResidualBlock(widths[i], widths[i + 1], norm_layer) for i in range(4)))
        self.avg_pool = avg_pool
        self.out_features = channels[-1] if avg_pool else channels[-1] * side * side
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0.1, mode="fan_out",
                                        nonlinearity="leaky_relu")

    def forward(self, x: Tensor) -> Tensor:
        """``x: [batch, in_channels, image_size, image_size] -> [batch, out_features]``."""
        maps = self.blocks(x)
        return maps.mean(dim=(2, 3)) if self.avg_pool else maps.flatten(1)
