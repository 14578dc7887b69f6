"""Each task's backward pass on its worker as soon as the task has run (``Threads``): one
task's graph per worker is alive at a time, and the meta-gradient equals the loop's in
float64 for any meta-loss: the predicted weighting (a mean over tasks, scaled or not), a
multi-step weighting seen for the first time (the tasks run again) and then predicted, and
tasks weighted unequally."""

from __future__ import annotations

import gc
import weakref
from functools import partial

import pytest
import torch
from episodes_for_tests import (
    at_least_two_threads,
    meta_gradient,
    random_episodes,
    relative_error,
    tiny_model,
)

from fewshot.algorithms import MAML, MAMLPlusPlus
from fewshot.execution import Loop, Threads, run_meta_batch
from fewshot.execution.threads import predicted_weights, run_tasks_on_threads, scale_between

TASKS = 4


@pytest.fixture(autouse=True)
def two_threads():
    with at_least_two_threads():
        yield


@pytest.fixture
def task_runs(monkeypatch):
    """How many times a task function ran, counted per task (reruns included)."""
    runs = []
    original = run_tasks_on_threads

    def counting(run_task, *args, **kwargs):
        def counted(*task_args):
            runs.append(1)
            return run_task(*task_args)
        counted.func = getattr(run_task, "func", run_task)  # same owner for the predictions
        return original(counted, *args, **kwargs)

    monkeypatch.setattr("fewshot.execution.threads.run_tasks_on_threads", counting)
    return runs


def multi_step(first_order: bool = False) -> MAMLPlusPlus:
    """MAML++ at epoch 1 of 3: a multi-step loss whose weights are not the last step's alone."""
    return MAMLPlusPlus(inner_steps=2, inner_lr=0.25, multi_step_loss_epochs=3,
                        first_order_epochs=0 if first_order else 1, derivative_order_annealing=first_order,
                        per_step_bn_weights=False, batch_norm="transductive")


def gradients(algorithm, executor, weighting=None, epoch: int = 1):
    model = tiny_model()
    algorithm.build(model)
    episodes = random_episodes(tasks=TASKS)
    if weighting is None:
        _, results, grads = meta_gradient(algorithm, model, episodes, executor, epoch=epoch)
        return results, grads
    params = list(model.parameters())
    results = run_meta_batch(algorithm, model, episodes, executor, epoch=epoch)
    return results, torch.autograd.grad(weighting(results.objective), params)


@pytest.mark.parametrize("first_order", [False, True])
def test_a_mean_over_tasks_is_predicted_exact_and_runs_each_task_once(first_order, task_runs):
    def maml():
        return MAML(inner_steps=2, inner_lr=0.3, first_order=first_order)
    _, expected = gradients(maml(), Loop(), epoch=0)
    _, grads = gradients(maml(), Threads(), epoch=0)
    assert len(task_runs) == TASKS
    assert relative_error(list(grads.values()), list(expected.values())) < 1e-12


def test_a_scaled_meta_loss_is_exact_without_running_the_tasks_again(task_runs):
    def scaled(objective):  # a DDP share weight or a loss scale: one factor for every task
        return 3.7 * objective[:, -1].mean()
    _, expected = gradients(MAML(inner_steps=1, inner_lr=0.3), Loop(), scaled, epoch=0)
    _, grads = gradients(MAML(inner_steps=1, inner_lr=0.3), Threads(), scaled, epoch=0)
    assert len(task_runs) == TASKS
    assert relative_error(grads, expected) < 1e-12


@pytest.mark.parametrize("first_order", [False, True])
def test_a_new_multi_step_weighting_runs_the_tasks_again_once_then_is_predicted(first_order, task_runs):
    algorithm = multi_step(first_order)
    _, expected = gradients(multi_step(first_order), Loop())
    model = tiny_model()
    algorithm.build(model)
    for runs in (2 * TASKS, TASKS):  # first seen: predicted wrong, run again; then predicted
        task_runs.clear()
        _, results, grads = meta_gradient(algorithm, model, random_episodes(tasks=TASKS),
                                          Threads(), epoch=1)
        assert results.objective.shape == (TASKS, 3)
        assert len(task_runs) == runs
        assert relative_error(list(grads.values()), list(expected.values())) < 1e-12


def test_tasks_weighted_unequally_get_the_exact_meta_gradient(task_runs):
    def weighted(objective):
        return (objective[:, -1] * torch.arange(1.0, TASKS + 1, dtype=objective.dtype)).sum()
    _, expected = gradients(MAML(inner_steps=2, inner_lr=0.3), Loop(), weighted, epoch=0)
    _, grads = gradients(MAML(inner_steps=2, inner_lr=0.3), Threads(), weighted, epoch=0)
    assert len(task_runs) == 2 * TASKS
    assert relative_error(grads, expected) < 1e-12


def test_each_tasks_graph_is_freed_before_the_meta_loss_is_differentiated():
    saved = []

    def run_task(model, weight, task):
        hidden = weight * task[0]
        saved.append(weakref.ref(hidden))  # kept by the graph (the square's backward) if alive
        return (hidden * hidden).sum().unsqueeze(0)

    weight = torch.ones(3, dtype=torch.float64, requires_grad=True)
    data = torch.rand(6, 3, dtype=torch.float64)
    objective = run_tasks_on_threads(run_task, torch.nn.Identity(), weight, [data])
    gc.collect()
    assert len(saved) == 6 and all(ref() is None for ref in saved)
    (grad,) = torch.autograd.grad(objective.mean(), weight)
    torch.testing.assert_close(grad, (2 * weight * data.square()).mean(0).detach(), rtol=1e-12, atol=0)


def test_predictions_default_to_the_last_entry_and_scales_are_found_or_refused():
    owner = object()
    weights = predicted_weights(id(owner), torch.zeros(3))
    assert weights.tolist() == [0, 0, 1]
    assert scale_between(torch.tensor([[0, 0, 0.25]] * 4), weights) == 0.25
    assert scale_between(torch.tensor([[0, 0.1, 0.25]] * 4), weights) is None
    assert scale_between(torch.tensor([[0, 0, 0.25], [0, 0, 0.5]]), weights) is None
    assert scale_between(torch.ones(2, 3), torch.zeros(3)) is None


def test_the_owner_of_a_partial_is_its_algorithm():
    from fewshot.execution.threads import _owner
    maml = MAML()
    assert _owner(maml.training_tasks(0)) == _owner(maml.training_tasks(1)) == id(maml)
    assert _owner(partial(len)) != id(maml)
