"""The inner loop and MAML against hand-written autograd references, in float64."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from episodes_for_tests import random_episodes, relative_error, tiny_model
from torch.func import functional_call

from fewshot.algorithms import MAML
from fewshot.core.episode import Episodes
from fewshot.core.inner_loop import TaskResult, adapt, inner_update, task_query_metrics
from fewshot.execution import Auto, Loop, Vmap, build_executor, run_meta_batch


def reference_meta_gradient(model, episodes, steps, lr, first_order):
    """Per-task MAML written with plain ``torch.autograd.grad``, as in the paper."""
    names = [name for name, _ in model.named_parameters()]
    meta_params = [p for _, p in model.named_parameters()]
    total = 0.0
    for sx, sy, qx, qy in zip(*episodes, strict=True):
        fast = list(meta_params)
        for _ in range(steps):
            loss = F.cross_entropy(functional_call(model, dict(zip(names, fast, strict=True)), (sx,)), sy)
            grads = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [w - lr * g for w, g in zip(fast, grads, strict=True)]
        total = total + F.cross_entropy(functional_call(model, dict(zip(names, fast, strict=True)), (qx,)), qy)
    meta_loss = total / episodes.num_tasks
    return meta_loss, torch.autograd.grad(meta_loss, meta_params)


def maml_meta_gradient(model, episodes, steps, lr, first_order, executor):
    algorithm = MAML(inner_steps=steps, inner_lr=lr, first_order=first_order)
    algorithm.build(model)
    params = dict(model.named_parameters())
    results = run_meta_batch(algorithm, model, episodes, executor, training=True, epoch=0)
    meta_loss = algorithm.meta_loss(results, epoch=0)
    return meta_loss, torch.autograd.grad(meta_loss, list(params.values()))


@pytest.mark.parametrize("executor", [Vmap(), Loop()], ids=["vmap", "loop"])
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_equals_autograd_reference(executor, steps, first_order):
    model, episodes = tiny_model(), random_episodes()
    ref_loss, ref_grads = reference_meta_gradient(model, episodes, steps, 0.4, first_order)
    loss, grads = maml_meta_gradient(model, episodes, steps, 0.4, first_order, executor)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert relative_error(grads, ref_grads) < 1e-8


def test_batch_norm_affine_parameters_are_adapted_and_get_second_order_gradients():
    # The trap this guards: vmap + fused batch norm gives wrong second-order gradients for the
    # adapted affine parameters. Their meta-gradient must match the loop reference exactly.
    model, episodes = tiny_model(), random_episodes()
    names = [name for name, _ in model.named_parameters()]
    _, ref = reference_meta_gradient(model, episodes, 2, 0.4, False)
    _, vmapped = maml_meta_gradient(model, episodes, 2, 0.4, False, Vmap())
    checked = 0
    for name, r, v in zip(names, ref, vmapped, strict=True):
        if name.endswith(("1.weight", "1.bias")):  # the first block's batch norm
            assert v.abs().sum() > 0
            torch.testing.assert_close(v, r, rtol=1e-9, atol=1e-12, msg=name)
            checked += 1
    assert checked == 2


def smooth_tiny_model():
    """The tiny model with ReLU and max-pool swapped for smooth ops: the inner gradient of a
    ReLU net jumps at kinks, which would break a finite-difference check of its derivative."""
    model = tiny_model()
    for index, layer in enumerate(model.features.blocks):
        if isinstance(layer, torch.nn.ReLU):
            model.features.blocks[index] = torch.nn.Softplus()
        elif isinstance(layer, torch.nn.MaxPool2d):
            model.features.blocks[index] = torch.nn.AvgPool2d(2)
    return model


def test_second_order_matches_directional_finite_difference():
    model, episodes = smooth_tiny_model(), random_episodes(tasks=2)
    algorithm = MAML(inner_steps=2, inner_lr=0.4)
    algorithm.build(model)
    params = dict(model.named_parameters())
    direction = {k: torch.randn_like(v) for k, v in params.items()}

    def meta_loss(p):
        results = run_meta_batch(algorithm, model, episodes, Vmap(), training=True, params=p)
        return algorithm.meta_loss(results, epoch=0)

    grads = torch.autograd.grad(meta_loss(params), list(params.values()))
    analytic = sum((g * direction[k]).sum() for g, k in zip(grads, params, strict=True))
    eps = 1e-6
    with torch.no_grad():
        plus = {k: v + eps * direction[k] for k, v in params.items()}
        minus = {k: v - eps * direction[k] for k, v in params.items()}
    numeric = (meta_loss(plus) - meta_loss(minus)) / (2 * eps)
    assert analytic.item() == pytest.approx(numeric.item(), rel=1e-6)


def test_first_order_differs_from_second_order():
    model, episodes = tiny_model(), random_episodes()
    _, second = maml_meta_gradient(model, episodes, 2, 0.4, False, Vmap())
    _, first = maml_meta_gradient(model, episodes, 2, 0.4, True, Vmap())
    assert relative_error(first, second) > 1e-3


def test_first_order_equals_second_order_with_detached_inner_gradients():
    """FOMAML is the second-order computation with every inner gradient made a constant."""
    model, episodes = tiny_model(), random_episodes()
    names = [name for name, _ in model.named_parameters()]
    meta_params = [p for _, p in model.named_parameters()]
    total = 0.0
    for sx, sy, qx, qy in zip(*episodes, strict=True):
        fast = list(meta_params)
        for _ in range(2):
            loss = F.cross_entropy(functional_call(model, dict(zip(names, fast, strict=True)), (sx,)), sy)
            grads = torch.autograd.grad(loss, fast, create_graph=True)
            fast = [w - 0.4 * g.detach() for w, g in zip(fast, grads, strict=True)]
        total = total + F.cross_entropy(functional_call(model, dict(zip(names, fast, strict=True)), (qx,)), qy)
    expected = torch.autograd.grad(total / episodes.num_tasks, meta_params)
    for executor in (Loop(), Vmap()):
        _, first = maml_meta_gradient(model, episodes, 2, 0.4, True, executor)
        assert relative_error(first, expected) < 1e-10, executor


def test_zero_steps_is_plain_query_loss():
    model, episodes = tiny_model(), random_episodes(tasks=1)
    params = dict(model.named_parameters())
    result = task_query_metrics(model, params, *(t[0] for t in episodes), steps=0, lr=0.4)
    assert isinstance(result, TaskResult)
    logits = model(episodes.query_x[0])
    expected = F.cross_entropy(logits, episodes.query_y[0]).item()
    assert result.losses.item() == pytest.approx(expected, rel=1e-12)
    assert result.objective.item() == pytest.approx(expected, rel=1e-12)


def test_objective_is_differentiable_and_losses_are_detached_copies():
    model, episodes = tiny_model(), random_episodes(tasks=1)
    params = dict(model.named_parameters())
    result = task_query_metrics(model, params, *(t[0] for t in episodes), steps=2, lr=0.4)
    assert result.objective.requires_grad and not result.losses.requires_grad
    torch.testing.assert_close(result.losses, result.objective.detach(), rtol=0, atol=0)
    # The inner gradient's norm per step, before any update: its own diagnostic.
    assert set(result.diagnostics) == {"inner_grad_norm/step_0", "inner_grad_norm/step_1"}
    sx, sy = episodes.support_x[0], episodes.support_y[0]
    grads = torch.autograd.grad(F.cross_entropy(model(sx), sy), list(params.values()))
    norm = torch.sqrt(sum(g.square().sum() for g in grads))
    torch.testing.assert_close(result.diagnostics["inner_grad_norm/step_0"], norm,
                               rtol=1e-12, atol=0)
    assert result.batch_norm_statistics == {}  # plain batch norm records nothing


def test_inner_update_is_one_gradient_step():
    model, episodes = tiny_model(), random_episodes(tasks=1)
    params = {n: p.detach() for n, p in model.named_parameters()}
    sx, sy = episodes.support_x[0], episodes.support_y[0]
    output = inner_update(model, params, sx, sy, 0.3, first_order=True)
    leaves = [p.clone().requires_grad_() for p in params.values()]
    loss = F.cross_entropy(functional_call(model, dict(zip(params, leaves, strict=True)), (sx,)), sy)
    grads = torch.autograd.grad(loss, leaves)
    for (name, p), g in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(output.params[name], p - 0.3 * g, rtol=1e-12, atol=1e-15)
    assert output.state == {}  # plain SGD keeps no state
    assert list(output.diagnostics) == ["inner_grad_norm/step_0"]


def test_every_step_scores_before_and_after_each_step_and_adaptation_fits_support():
    model, episodes = tiny_model(), random_episodes(tasks=2)
    algorithm = MAML(inner_steps=1, inner_lr=0.1, eval_inner_steps=4)
    algorithm.build(model)
    # Score the support set as the query: loss must fall step by step.
    support_as_query = Episodes(*episodes[:2], *episodes[:2])
    results = run_meta_batch(algorithm, model, support_as_query, Loop(), training=False)
    assert results.losses.shape == results.accuracies.shape == (2, 5)
    assert (results.losses[:, 1:] < results.losses[:, :-1]).all()
    assert not results.objective.requires_grad  # evaluation keeps no graph
    params = dict(model.named_parameters())
    adapted = adapt(model, params, episodes.support_x[0], episodes.support_y[0], steps=4, lr=0.1)
    final = F.cross_entropy(functional_call(model, adapted, (episodes.support_x[0],)),
                            episodes.support_y[0])
    assert final.item() == pytest.approx(results.losses[0, -1].item(), rel=1e-12)
    # The algorithm's own adapt() takes the same steps.
    adapted_by_algorithm = algorithm.adapt(model, params, episodes.support_x[0], episodes.support_y[0])
    assert adapted_by_algorithm.steps_taken == 4
    for name, p in adapted.items():
        torch.testing.assert_close(adapted_by_algorithm.params[name], p.detach(), rtol=1e-12, atol=1e-15)


def test_accuracy_is_fraction_of_correct_query_predictions():
    model, episodes = tiny_model(), random_episodes(tasks=1)
    params = dict(model.named_parameters())
    result = task_query_metrics(model, params, *(t[0] for t in episodes), steps=0, lr=0.0)
    predictions = model(episodes.query_x[0]).argmax(-1)
    expected = (predictions == episodes.query_y[0]).double().mean().item()
    assert result.accuracies.item() == pytest.approx(expected)


def test_vmap_chunking_gives_the_same_result():
    model, episodes = tiny_model(), random_episodes(tasks=3)
    loss, full = maml_meta_gradient(model, episodes, 1, 0.4, False, Vmap())
    chunked_loss, chunked = maml_meta_gradient(model, episodes, 1, 0.4, False, Vmap(chunk_size=2))
    assert chunked_loss.item() == pytest.approx(loss.item(), rel=1e-12)
    assert relative_error(chunked, full) < 1e-12


def test_auto_describes_the_executor_it_would_choose(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert Auto().describe(torch.device("cpu"), 10) == "threads"
    assert Auto().describe(torch.device("cpu"), 300) == "threads"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert Auto().describe(torch.device("cpu"), 10) == "vmap"
    assert Auto().describe(torch.device("cpu"), 30) == "loop"
    assert Auto().describe(torch.device("cuda"), 300) == "vmap"
    assert Vmap().describe(torch.device("cpu"), 10) == "vmap"
    assert Loop().describe(torch.device("cpu"), 10) == "loop"
    with pytest.raises(ValueError, match="'sequential'"):
        build_executor("sequential")


def test_the_readme_core_example_runs():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
              if "run_meta_batch(" in b]
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["results"].losses.shape == (4, 1)
    assert all(p.grad is not None for p in namespace["network"].parameters())
