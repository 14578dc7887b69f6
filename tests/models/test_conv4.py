"""Conv4 pools before its ReLU: the same function and derivatives as MAML's ReLU-then-pool."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from episodes_for_tests import random_episodes, relative_error, tiny_model

from fewshot.algorithms import MAML
from fewshot.execution import Loop, Vmap, run_meta_batch


def relu_then_pool(model, params, x):
    """MAML's block order, written out with the model's parameters."""
    blocks = model.features.blocks
    for i in range(4):
        norm = blocks[4 * i + 1]
        x = F.conv2d(x, params[f"features.blocks.{4 * i}.weight"],
                     params[f"features.blocks.{4 * i}.bias"], padding=1)
        x = F.batch_norm(x, None, None, params[f"features.blocks.{4 * i + 1}.weight"],
                         params[f"features.blocks.{4 * i + 1}.bias"], True, 0.0, norm.eps)
        x = F.max_pool2d(F.relu(x), 2)
    return F.linear(x.flatten(1), params["head.weight"], params["head.bias"])


def test_block_order_is_conv_norm_pool_relu():
    kinds = [type(layer).__name__ for layer in tiny_model().features.blocks][:4]
    assert kinds == ["Conv2d", "TransductiveBatchNorm2d", "MaxPool2d", "ReLU"]


def test_pooling_first_gives_maml_second_order_meta_gradient():
    model, episodes = tiny_model(), random_episodes()
    params = dict(model.named_parameters())
    names, values = list(params), list(params.values())
    total = 0.0
    for sx, sy, qx, qy in zip(*episodes, strict=True):  # MAML, 2 steps, ReLU before pooling
        fast = values
        for _ in range(2):
            loss = F.cross_entropy(relu_then_pool(model, dict(zip(names, fast, strict=True)), sx), sy)
            fast = [w - 0.4 * g for w, g in zip(fast, torch.autograd.grad(loss, fast, create_graph=True), strict=True)]
        total = total + F.cross_entropy(relu_then_pool(model, dict(zip(names, fast, strict=True)), qx), qy)
    expected = torch.autograd.grad(total / episodes.num_tasks, values)
    algorithm = MAML(inner_steps=2, inner_lr=0.4)
    algorithm.build(model)
    for executor in (Loop(), Vmap()):
        results = run_meta_batch(algorithm, model, episodes, executor, training=True)
        actual = torch.autograd.grad(algorithm.meta_loss(results, epoch=0), values)
        assert relative_error(actual, expected) < 1e-10, executor
