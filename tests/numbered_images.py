"""A dataset whose images tell where they came from, for sampler tests."""

from __future__ import annotations

import torch


class NumberedImages:
    """Class ``c`` image ``i`` is a 1x2x2 image filled with the value ``100 * c + i``, so a
    sampled image tells which class and which image it came from."""

    def __init__(self, class_sizes: list[int]) -> None:
        self.class_sizes = class_sizes
        self.classes = [f"class{c}" for c in range(len(class_sizes))]

    def load_class_images(self, class_id, image_indices):
        values = torch.tensor([100.0 * class_id + i for i in image_indices])
        return values.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).clone()
