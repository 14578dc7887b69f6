"""Batch norm with batch statistics: every implementation path exact to second order, float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from episodes_for_tests import meta_gradient, random_episodes, relative_error, tiny_model

import fewshot.models.batch_norm as batch_norm
from fewshot.algorithms import MAML
from fewshot.execution import Loop
from fewshot.models.batch_norm import batch_norm_with_batch_statistics


def inputs(batch: int = 4, channels: int = 3, side: int = 5):
    g = torch.Generator().manual_seed(0)
    # A non-zero mean and uneven scales: the closed form must not assume centred inputs.
    x = torch.randn(batch, channels, side, side, generator=g, dtype=torch.float64) * 2 + 1.5
    weight = torch.randn(channels, generator=g, dtype=torch.float64)
    bias = torch.randn(channels, generator=g, dtype=torch.float64)
    return [t.requires_grad_() for t in (x, weight, bias)]


def closed_form(x, weight, bias):
    return batch_norm_with_batch_statistics(x, weight, bias, 1e-5)


def fused(x, weight, bias):
    return F.batch_norm(x, None, None, weight, bias, True, 0.0, 1e-5)


def test_the_closed_form_path_runs_outside_transforms():
    x, weight, bias = inputs()
    y = closed_form(x, weight, bias)
    assert type(y.grad_fn).__name__ == "_BatchNormBackward"
    (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    assert type(grad_x.grad_fn).__name__ == "_BatchNormGradientsBackward"


def test_closed_form_passes_gradcheck_and_gradgradcheck():
    assert torch.autograd.gradcheck(closed_form, tuple(inputs()))
    assert torch.autograd.gradgradcheck(closed_form, tuple(inputs()))


@pytest.mark.parametrize("wanted", [(0, 1, 2), (0,), (1,), (2,), (0, 2)])
def test_closed_form_second_derivatives_equal_autograd_through_the_fused_kernel(wanted):
    # Backward with create_graph, then differentiate a random combination of only some of the
    # first derivatives: the unused ones reach the closed form as None (not materialised).
    g = torch.Generator().manual_seed(1)
    results = []
    for function in (closed_form, fused):
        x, weight, bias = inputs()
        upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(2),
                               dtype=x.dtype).requires_grad_()
        first = torch.autograd.grad(function(x, weight, bias), (x, weight, bias), upstream,
                                    create_graph=True)
        g.manual_seed(3)
        combination = sum((first[i] * torch.randn(first[i].shape, generator=g, dtype=x.dtype)).sum()
                          for i in wanted)
        results.append(torch.autograd.grad(combination, (x, weight, upstream), allow_unused=True))
    for ours, reference in zip(*results, strict=True):
        if reference is None:
            assert ours is None or ours.abs().max() < 1e-12
        else:
            torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


def test_third_derivatives_equal_those_of_primitive_ops(monkeypatch):
    # MAML needs two derivatives; a third (create_graph on the meta-gradient) must still be
    # right, never silently missing terms.
    def third(function):
        x, weight, bias = inputs()
        y = function(x, weight, bias)
        (grad_x,) = torch.autograd.grad((y.square() * x).sum(), x, create_graph=True)
        second = torch.autograd.grad(grad_x.square().sum(), (x, weight), create_graph=True)
        return torch.autograd.grad(sum(t.square().sum() for t in second), (x, weight, bias))
    closed = third(closed_form)
    monkeypatch.setattr(batch_norm, "inside_vmap", lambda: True)  # primitive ops
    primitive = third(closed_form)
    for ours, reference in zip(closed, primitive, strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)


def test_every_path_gives_the_same_meta_gradient(monkeypatch):
    model, episodes = tiny_model(), random_episodes()
    algorithm = MAML(inner_steps=3, inner_lr=0.4)  # second order
    algorithm.build(model)

    def gradients() -> tuple[torch.Tensor, list[torch.Tensor]]:
        loss, _, grads = meta_gradient(algorithm, model, episodes, Loop())
        return loss, list(grads.values())

    closed = gradients()
    monkeypatch.setattr(batch_norm, "inside_functorch_transform", lambda: True)  # fused kernel
    fused_kernel = gradients()
    monkeypatch.setattr(batch_norm, "inside_vmap", lambda: True)  # primitive ops
    primitive = gradients()
    for other in (fused_kernel, primitive):
        assert other[0].item() == pytest.approx(closed[0].item(), rel=1e-12)
        assert relative_error(closed[1], other[1]) < 1e-12


def test_fused_kernel_under_grad_without_vmap():
    x, weight, bias = (t.detach() for t in inputs())
    def loss(w):
        return batch_norm_with_batch_statistics(x, w, bias, 1e-5).square().mul(x).sum()
    w = weight.clone().requires_grad_()
    (expected,) = torch.autograd.grad(fused(x, w, bias).square().mul(x).sum(), w)
    torch.testing.assert_close(torch.func.grad(loss)(weight), expected, rtol=1e-12, atol=0)


def test_autocast_and_other_dtypes_take_the_fused_kernel():
    x, weight, bias = (t.detach().float().requires_grad_() for t in inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = batch_norm_with_batch_statistics(x.bfloat16(), weight, bias, 1e-5)
    assert type(y.grad_fn).__name__ == "NativeBatchNormBackward0"
    torch.testing.assert_close(y.float(), fused(x, weight, bias), rtol=0.05, atol=0.05)
    y = batch_norm_with_batch_statistics(x.bfloat16(), weight.bfloat16(), bias.bfloat16(), 1e-5)
    assert type(y.grad_fn).__name__ == "NativeBatchNormBackward0"  # bfloat16 without autocast


def test_inside_vmap_sees_vmap_through_grad():
    seen = []
    def f(x):
        seen.append((batch_norm.inside_vmap(), batch_norm.inside_functorch_transform()))
        return x.sum()
    f(torch.ones(2))
    torch.func.grad(f)(torch.ones(2))
    torch.func.vmap(torch.func.grad(f))(torch.ones(3, 2))
    torch.func.grad(lambda x: torch.func.vmap(f)(x).sum())(torch.ones(3, 2))
    assert seen == [(False, False), (False, True), (True, True), (True, True)]
