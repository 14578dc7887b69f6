"""Tasks on worker threads: the loop's values and gradients (float64), one core per worker."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_maml import random_episodes, relative_error, tiny_model
from test_mamlpp import ALL_ON, episodes, learner, meta_gradient

import fewshot.maml
from fewshot.maml import meta_batch_metrics
from fewshot.task_threads import run_tasks_on_threads, tasks_on_threads_supported


@pytest.fixture(autouse=True)
def two_threads():
    """Two intra-op threads, so that ``threads`` runs on two workers even on a one-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def results(batching, model=None, batch=None, lr=0.4, steps=2, first_order=False, **options):
    model = model or tiny_model()
    batch = batch or random_episodes(tasks=5)
    params = dict(model.named_parameters())
    differentiable = list(params.values()) + (list(lr.values()) if isinstance(lr, dict) else [])
    losses, accuracies, statistics = meta_batch_metrics(
        model, params, batch, steps=steps, lr=lr, first_order=first_order, every_step=True,
        batching=batching, **options)
    # Weights per task and step: the backward pass must route each task's slice to its worker.
    weights = torch.arange(1.0, losses.numel() + 1, dtype=losses.dtype).view_as(losses)
    grads = torch.autograd.grad((losses * weights).sum(), differentiable)
    return losses, accuracies, statistics, grads


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_threads_give_the_loops_values_and_meta_gradients(first_order, steps):
    loop = results("loop", steps=steps, first_order=first_order)
    threads = results("threads", steps=steps, first_order=first_order)
    torch.testing.assert_close(threads[0], loop[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(threads[1], loop[1], rtol=0, atol=0)
    assert threads[2].keys() == loop[2].keys()
    for key in loop[2]:
        torch.testing.assert_close(threads[2][key], loop[2][key], rtol=1e-12, atol=1e-15)
    assert relative_error(threads[3], loop[3]) < 1e-12


def test_threads_pass_gradients_to_learned_rates():
    model = tiny_model()
    lr = {name: torch.full((2,), 0.3, dtype=torch.float64, requires_grad=True)
          for name, _ in model.named_parameters()}
    loop, threads = (results(batching, model=model, lr=lr) for batching in ("loop", "threads"))
    assert relative_error(threads[3], loop[3]) < 1e-12
    assert all(g.abs().sum() > 0 for g in threads[3][-len(lr):])


def test_mamlpp_with_per_step_batch_norm_statistics_on_threads():
    batch = episodes(tasks=4)
    models = {b: learner(**ALL_ON, batching=b) for b in ("loop", "threads")}
    (loop_loss, loop_grads), (loss, grads) = (meta_gradient(m, batch) for m in models.values())
    assert loss.item() == pytest.approx(loop_loss.item(), rel=1e-12)
    for name, grad in loop_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-10, atol=1e-14, msg=name)
    (_, loop_metrics, _), (_, metrics, _) = (m.meta_loss(batch, epoch=0) for m in models.values())
    statistics, loop_statistics = metrics.statistics, loop_metrics.statistics
    assert any("/1/mean" in key for key in statistics)  # per-step statistics came back by value
    assert statistics.keys() == loop_statistics.keys()
    for key, value in loop_statistics.items():
        torch.testing.assert_close(statistics[key], value, rtol=1e-10, atol=1e-14, msg=key)


def test_tasks_run_on_two_single_threaded_workers_and_the_caller_keeps_its_threads():
    seen = []
    def run_task(model, differentiable, task):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        time.sleep(0.05)  # long enough that the other worker takes the other half
        return (differentiable * task[0]).sum().unsqueeze(0)
    weight = torch.ones(3, requires_grad=True)
    out = run_tasks_on_threads(run_task, torch.nn.Identity(), weight, [torch.arange(12.0).view(4, 3)])
    assert out.shape == (4, 1)
    assert len({name for name, _ in seen}) == 2
    assert all(name.startswith("fewshot-tasks") and threads == 1 for name, threads in seen)
    assert torch.get_num_threads() == 2
    (grad,) = torch.autograd.grad(out.sum(), weight)
    torch.testing.assert_close(grad, torch.arange(12.0).view(4, 3).sum(0))


def test_without_gradients_no_graph_is_kept():
    with torch.no_grad():
        losses, _, _, = meta_batch_metrics(tiny_model(), dict(tiny_model().named_parameters()),
                                           random_episodes(), steps=1, lr=0.4, batching="threads")
    assert not losses.requires_grad
    loop, _, _ = meta_batch_metrics(tiny_model(), dict(tiny_model().named_parameters()),
                                    random_episodes(), steps=1, lr=0.4, batching="loop")
    torch.testing.assert_close(losses, loop.detach(), rtol=1e-12, atol=0)


def test_a_second_backward_or_a_third_order_gradient_is_refused_by_name():
    model = tiny_model()
    params = dict(model.named_parameters())
    losses, _, _ = meta_batch_metrics(model, params, random_episodes(), steps=1, lr=0.4,
                                      batching="threads")
    loss = (losses * 2).sum()
    torch.autograd.grad(loss, list(params.values()), retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(loss, list(params.values()))
    losses, _, _ = meta_batch_metrics(model, params, random_episodes(), steps=1, lr=0.4,
                                      batching="threads")
    with pytest.raises(RuntimeError, match="batching='loop'"):
        torch.autograd.grad(losses.sum(), list(params.values()), create_graph=True)


def test_an_error_in_a_task_reaches_the_caller():
    batch = random_episodes()
    bad = batch._replace(support_y=batch.support_y + 10)  # labels past the head's outputs
    with pytest.raises(IndexError):
        meta_batch_metrics(tiny_model(), dict(tiny_model().named_parameters()), bad, steps=1,
                           lr=0.4, batching="threads")


@pytest.mark.parametrize("situation", ["vmap", "autocast", "checkpoint", "budget", "one thread"])
def test_threads_fall_back_to_the_loop_where_they_cannot_run(situation, monkeypatch):
    calls = []
    original = fewshot.maml.run_tasks_on_threads
    monkeypatch.setattr(fewshot.maml, "run_tasks_on_threads",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    model, batch = tiny_model(), random_episodes(tasks=2)
    params = dict(model.named_parameters())
    def run(**options):
        return meta_batch_metrics(model, params, batch, steps=1, lr=0.4, batching="threads", **options)
    if situation == "vmap":
        torch.func.vmap(lambda x: run()[0].sum() * x)(torch.ones(2, dtype=torch.float64))
    elif situation == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not tasks_on_threads_supported(torch.device("cpu"))
            run()
    elif situation == "checkpoint":
        run(checkpoint_inner_steps=True)
    elif situation == "budget":
        run(memory_budget=2**30)
    else:
        torch.set_num_threads(1)
        run()
        torch.set_num_threads(2)
    assert calls == []
    run()
    assert calls == [1]  # the same call with nothing in the way does use the threads


def test_a_forked_child_starts_its_own_workers():
    import multiprocessing

    run_tasks_on_threads(lambda m, d, t: (d * t[0]).sum().unsqueeze(0), torch.nn.Identity(),
                         torch.ones(2), [torch.ones(4, 2)])  # the parent's pool exists
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        result = pool.apply_async(_run_in_child).get(timeout=60)
    assert result == [[2.0]] * 4


def _run_in_child():
    torch.set_num_threads(2)
    out = run_tasks_on_threads(lambda m, d, t: (d * t[0]).sum().unsqueeze(0), torch.nn.Identity(),
                               torch.ones(2), [torch.ones(4, 2)])
    return out.tolist()
