"""Reptile against a hand computation in float64: the meta-gradient is the mean over tasks of
``params - adapted``, so SGD of rate epsilon moves to ``params + epsilon * mean(adapted - params)``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from episodes_for_tests import random_episodes, tiny_model
from torch.func import functional_call

from fewshot.algorithms import Reptile
from fewshot.execution import Loop, run_meta_batch

STEPS, LR = 3, 0.1


def adapted_by_hand(network, params: dict[str, torch.Tensor], x, y, steps: int, lr: float
                    ) -> list[dict[str, torch.Tensor]]:
    """Plain SGD on the support loss with ``torch.autograd``: the parameters after 0..steps
    updates."""
    trajectory = [{n: p.detach() for n, p in params.items()}]
    for _ in range(steps):
        current = trajectory[-1]
        leaves = [p.clone().requires_grad_() for p in current.values()]
        loss = F.cross_entropy(functional_call(network, dict(zip(current, leaves, strict=True)), (x,)), y)
        grads = torch.autograd.grad(loss, leaves)
        trajectory.append({n: p - lr * g for (n, p), g in zip(current.items(), grads, strict=True)})
    return trajectory


def setup(tasks: int = 3):
    network, episodes = tiny_model(), random_episodes(tasks=tasks)
    reptile = Reptile(inner_steps=STEPS, inner_lr=LR)
    reptile.build(network)
    return network, reptile, episodes


def expected_meta_gradient(network, episodes) -> dict[str, torch.Tensor]:
    """Mean over tasks of ``params - adapted``."""
    params = dict(network.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for sx, sy, _, _ in zip(*episodes, strict=True):
        adapted = adapted_by_hand(network, params, sx, sy, STEPS, LR)[-1]
        for n, p in params.items():
            total[n] += (p.detach() - adapted[n]) / episodes.num_tasks
    return total


@pytest.mark.parametrize("tasks", [2, 3])
def test_meta_gradient_is_the_mean_of_params_minus_adapted(tasks):
    network, reptile, episodes = setup(tasks)
    params = dict(network.named_parameters())
    results = run_meta_batch(reptile, network, episodes, Loop(), training=True, epoch=0)
    assert results.objective.shape == (tasks, 1)
    grads = torch.autograd.grad(reptile.meta_loss(results, 0), list(params.values()))
    expected = expected_meta_gradient(network, episodes)
    for (name, _), grad in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(grad, expected[name], rtol=1e-10, atol=1e-13, msg=name)
    assert expected["head.weight"].abs().sum() > 0  # the adaptation moved the parameters


def test_sgd_on_the_meta_gradient_moves_towards_the_adapted_weights():
    network, reptile, episodes = setup()
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    params = dict(network.named_parameters())
    adapted = [adapted_by_hand(network, params, sx, sy, STEPS, LR)[-1]
               for sx, sy, _, _ in zip(*episodes, strict=True)]
    epsilon = 0.5
    optimizer = torch.optim.SGD(network.parameters(), lr=epsilon)
    optimizer.zero_grad()
    reptile.meta_loss(run_meta_batch(reptile, network, episodes, Loop(), training=True), 0).backward()
    optimizer.step()
    for name, p in network.named_parameters():
        mean_adapted = torch.stack([a[name] for a in adapted]).mean(dim=0)
        expected = before[name] + epsilon * (mean_adapted - before[name])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-13, msg=name)


def test_training_results_score_the_query_set_after_adapting():
    network, reptile, episodes = setup()
    results = run_meta_batch(reptile, network, episodes, Loop(), training=True)
    params = dict(network.named_parameters())
    for task, (sx, sy, qx, qy) in enumerate(zip(*episodes, strict=True)):
        adapted = adapted_by_hand(network, params, sx, sy, STEPS, LR)[-1]
        logits = functional_call(network, adapted, (qx,))
        assert results.losses[task, 0].item() == pytest.approx(
            F.cross_entropy(logits, qy).item(), rel=1e-10)
        accuracy = (logits.argmax(-1) == qy).double().mean().item()
        assert results.accuracies[task, 0].item() == pytest.approx(accuracy)
    assert not results.losses.requires_grad and results.objective.requires_grad


def test_reptile_is_first_order_and_learns_no_rates():
    network, reptile, _ = setup()
    assert reptile.meta_parameters() == {} and len(list(reptile.parameters())) == 0
    assert all(reptile.first_order_at(epoch) for epoch in (0, 10, 1000))
    assert reptile.evaluation_steps == STEPS
    assert Reptile().inner_steps == 5 and Reptile().inner_lr == 0.1


def test_evaluation_tasks_score_after_every_step():
    network, episodes = tiny_model(), random_episodes(tasks=2)
    reptile = Reptile(inner_steps=1, inner_lr=LR, eval_inner_steps=4, eval_inner_lr=0.05)
    reptile.build(network)
    results = run_meta_batch(reptile, network, episodes, Loop(), training=False)
    assert results.losses.shape == results.accuracies.shape == (2, 5)
    params = dict(network.named_parameters())
    for task, (sx, sy, qx, qy) in enumerate(zip(*episodes, strict=True)):
        trajectory = adapted_by_hand(network, params, sx, sy, 4, 0.05)
        for step, adapted in enumerate(trajectory):
            logits = functional_call(network, adapted, (qx,))
            assert results.losses[task, step].item() == pytest.approx(
                F.cross_entropy(logits, qy).item(), rel=1e-10), (task, step)
    # adapt() takes the evaluation steps and rate as well.
    adapted = reptile.adapt(network, params, episodes.support_x[0], episodes.support_y[0])
    assert adapted.steps_taken == 4
    by_hand = adapted_by_hand(network, params, episodes.support_x[0], episodes.support_y[0], 4, 0.05)[-1]
    for name, p in by_hand.items():
        torch.testing.assert_close(adapted.params[name], p, rtol=1e-10, atol=1e-13)
