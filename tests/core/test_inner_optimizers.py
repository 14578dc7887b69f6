"""Inner optimizers: each update equals torch.optim's or a hand computation, stays
differentiable (second order), and runs the same under vmap."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from episodes_for_tests import random_episodes, relative_error, tiny_model
from torch.func import vmap

from fewshot.algorithms import MAML
from fewshot.core.inner_loop import InnerLoop, adapt
from fewshot.core.inner_optimizers import (
    INNER_OPTIMIZERS,
    SGD,
    Adam,
    Momentum,
    build_inner_optimizer,
    clip_by_norm,
)
from fewshot.execution import Loop, Vmap, run_meta_batch


def run_transform(optimizer, gradients: list[dict[str, torch.Tensor]], lr: float, params):
    state = optimizer.init(params)
    for step, grads in enumerate(gradients):
        directions, state = optimizer.direction(grads, state, step)
        params = {n: p - lr * directions[n] for n, p in params.items()}
    return params


def gradient_sequence(steps: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    # One entry exactly zero, as for conv biases that batch norm cancels.
    return [{"w": torch.randn(3, 2, generator=g, dtype=torch.float64) * torch.tensor([[1.0, 0.0]] * 3,
                                                                                    dtype=torch.float64),
             "b": torch.randn(4, generator=g, dtype=torch.float64)} for _ in range(steps)]


@pytest.mark.parametrize("optimizer, reference", [
    (SGD(), lambda p: torch.optim.SGD(p, lr=0.1)),
    (Momentum(0.9), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
    (Adam(0.9, 0.999, 1e-8, eps_inside_sqrt=False), lambda p: torch.optim.Adam(p, lr=0.1, eps=1e-8)),
    (Adam(0.8, 0.99, 1e-3, eps_inside_sqrt=False), lambda p: torch.optim.Adam(p, lr=0.1, betas=(0.8, 0.99), eps=1e-3)),
])
def test_updates_match_torch_optim(optimizer, reference):
    gradients = gradient_sequence()
    start = {"w": torch.ones(3, 2, dtype=torch.float64), "b": torch.zeros(4, dtype=torch.float64)}
    ours = run_transform(optimizer, gradients, 0.1, start)
    tensors = {n: p.clone().requires_grad_() for n, p in start.items()}
    torch_optimizer = reference(list(tensors.values()))
    for grads in gradients:
        for n, p in tensors.items():
            p.grad = grads[n].clone()
        torch_optimizer.step()
    for n in start:
        torch.testing.assert_close(ours[n], tensors[n].detach(), rtol=1e-12, atol=1e-12)


def test_adam_with_eps_inside_the_square_root_matches_a_hand_computation():
    g1, g2 = torch.tensor([0.5, 0.0, -2.0], dtype=torch.float64), torch.tensor([0.1, 0.0, 1.0], dtype=torch.float64)
    b1, b2, eps, lr = 0.9, 0.999, 1e-3, 0.01
    m1, v1 = (1 - b1) * g1, (1 - b2) * g1 ** 2
    m2, v2 = b1 * m1 + (1 - b1) * g2, b2 * v1 + (1 - b2) * g2 ** 2
    expected = -lr * (m1 / (1 - b1)) / torch.sqrt(v1 / (1 - b2) + eps ** 2)
    expected = expected - lr * (m2 / (1 - b1 ** 2)) / torch.sqrt(v2 / (1 - b2 ** 2) + eps ** 2)
    ours = run_transform(Adam(b1, b2, eps), [{"x": g1}, {"x": g2}], lr, {"x": torch.zeros(3, dtype=torch.float64)})
    torch.testing.assert_close(ours["x"], expected, rtol=1e-12, atol=0)


def test_clip_by_norm_scales_only_above_the_bound():
    grads = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}  # joint norm 5
    clipped = clip_by_norm(grads, 1.0)
    torch.testing.assert_close(clipped["a"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(clipped["b"], torch.tensor([0.8]))
    assert clip_by_norm(grads, 10.0)["b"].item() == pytest.approx(4.0)
    assert clip_by_norm(grads, None) is grads


@pytest.mark.parametrize("optimizer", [Momentum(0.9), Adam(), Adam(eps=1e-8)])
def test_transforms_are_twice_differentiable(optimizer):
    """gradgradcheck: second-order MAML differentiates the update of the update."""
    gradients = gradient_sequence(2)
    flat = [t for grads in gradients for t in (grads["w"][:, 0], grads["b"])]

    def update(*tensors):
        grads = [{"w": torch.stack([tensors[2 * i], tensors[2 * i] * 0], dim=1), "b": tensors[2 * i + 1]}
                 for i in range(2)]
        start = {"w": torch.zeros(3, 2, dtype=torch.float64), "b": torch.zeros(4, dtype=torch.float64)}
        out = run_transform(optimizer, grads, 0.1, start)
        return out["w"], out["b"]

    inputs = [t.clone().requires_grad_() for t in flat]
    assert torch.autograd.gradcheck(update, inputs)
    assert torch.autograd.gradgradcheck(update, inputs)


def test_pytorch_adam_eps_gives_nan_second_order_gradients_where_a_gradient_is_zero():
    """The measured reason inner Adam 'explodes': sqrt has an infinite slope at 0."""
    g = torch.tensor([0.0, 1.0], dtype=torch.float64, requires_grad=True)
    for optimizer, finite in ((Adam(eps=1e-8, eps_inside_sqrt=False), False), (Adam(eps=1e-8), True)):
        direction, _ = optimizer.direction({"x": g}, optimizer.init({"x": g}), 0)
        (derivative,) = torch.autograd.grad(direction["x"].sum(), g)
        assert bool(torch.isfinite(derivative).all()) == finite


@pytest.mark.parametrize("optimizer", [SGD(), Momentum(0.5), Adam()])
def test_transforms_run_under_vmap(optimizer):
    g = torch.Generator().manual_seed(2)
    grads = [{"x": torch.randn(5, 3, generator=g)} for _ in range(3)]
    params = {"x": torch.zeros(3)}

    def per_task(g0, g1, g2):
        return run_transform(optimizer, [{"x": g0}, {"x": g1}, {"x": g2}], 0.1, params)["x"]

    batched = vmap(per_task)(*(s["x"] for s in grads))
    looped = torch.stack([per_task(*(s["x"][i] for s in grads)) for i in range(5)])
    torch.testing.assert_close(batched, looped)


@pytest.mark.parametrize("optimizer, reference", [
    (Momentum(0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    (Adam(eps=1e-8, eps_inside_sqrt=False), lambda p: torch.optim.Adam(p, lr=0.05, eps=1e-8)),
], ids=["momentum", "adam"])
def test_adapting_a_network_equals_torch_optim_on_a_copy(optimizer, reference):
    model, task = tiny_model(), random_episodes(tasks=1)
    sx, sy = task.support_x[0], task.support_y[0]
    params = {n: p.detach() for n, p in model.named_parameters()}
    ours = adapt(model, params, sx, sy, steps=3, lr=0.05, first_order=True, inner=InnerLoop(optimizer))
    copied = copy.deepcopy(model)
    torch_optimizer = reference(copied.parameters())
    for _ in range(3):
        torch_optimizer.zero_grad()
        F.cross_entropy(copied(sx), sy).backward()
        torch_optimizer.step()
    # Conv biases have gradients of rounding noise (batch norm cancels them), which Adam turns
    # into steps of ~1e-10 whose digits differ between the two computations.
    for n, p in copied.named_parameters():
        torch.testing.assert_close(ours[n], p.detach(), rtol=1e-10, atol=1e-8)


def test_inner_optimizers_by_name_and_settings_and_bad_values():
    assert set(INNER_OPTIMIZERS) == {"sgd", "momentum", "adam"}
    assert build_inner_optimizer("sgd") == SGD()
    assert build_inner_optimizer("momentum") == Momentum(0.9)
    assert build_inner_optimizer("adam") == Adam(0.9, 0.999, 1e-3, True)
    for optimizer in (SGD(), Momentum(0.5), Adam(0.5, 0.9, 1e-4, eps_inside_sqrt=False)):
        assert build_inner_optimizer(optimizer.settings()) == optimizer  # checkpoints rebuild it
    assert Adam(0.5) != Adam(0.6) and Momentum(0.5) != Adam()
    with pytest.raises(ValueError, match="'rmsprop'"):
        build_inner_optimizer("rmsprop")
    with pytest.raises(ValueError, match="cannot build inner_optimizer"):
        build_inner_optimizer({"class_path": "fewshot.core.inner_optimizers.adam.Adam",
                               "init_args": {"momentum": 0.9}})
    with pytest.raises(ValueError, match="momentum"):
        Momentum(1.5)
    with pytest.raises(ValueError, match="eps"):
        Adam(eps=0.0)
    with pytest.raises(ValueError, match="beta1"):
        Adam(beta1=1.0)
    with pytest.raises(ValueError, match="beta2"):
        Adam(beta2=-0.1)


@pytest.mark.parametrize("optimizer", [Momentum(0.9), Adam()])
def test_vmap_and_loop_agree_for_every_optimizer_in_float64(optimizer):
    model, batch = tiny_model(), random_episodes()
    algorithm = MAML(inner_steps=3, inner_lr=0.05, inner_max_grad_norm=0.5)
    algorithm.build(model, optimizer)
    assert algorithm.inner_loop() == InnerLoop(optimizer, 0.5, None)
    results = []
    for executor in (Vmap(), Loop()):
        params = dict(model.named_parameters())
        outputs = run_meta_batch(algorithm, model, batch, executor, training=True)
        loss = algorithm.meta_loss(outputs, epoch=0)
        results.append((loss, torch.autograd.grad(loss, list(params.values()))))
    (vmap_loss, vmapped), (loop_loss, looped) = results
    assert vmap_loss.item() == pytest.approx(loop_loss.item(), rel=1e-12)
    for a, b in zip(vmapped, looped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    # The optimizer is really used: plain SGD gives another meta-gradient.
    sgd = MAML(inner_steps=3, inner_lr=0.05, inner_max_grad_norm=0.5)
    sgd.build(model)
    loss = sgd.meta_loss(run_meta_batch(sgd, model, batch, Loop(), training=True), epoch=0)
    assert relative_error(torch.autograd.grad(loss, list(model.parameters())), looped) > 1e-3
