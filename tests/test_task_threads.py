"""Tasks on worker threads: the loop's values and gradients (float64), one core per worker."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from test_maml import random_episodes, relative_error, tiny_model
from test_mamlpp import ALL_ON, episodes, learner, meta_gradient

import fewshot.maml
from fewshot.core.episode import Episodes
from fewshot.maml import meta_batch_metrics
from fewshot.execution.threads import run_tasks_on_threads, tasks_on_threads_supported


@pytest.fixture(autouse=True)
def two_threads():
    """Two intra-op threads, so that ``threads`` runs on two workers even on a one-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def threaded_calls(monkeypatch):
    """How many meta-batches went to the worker threads."""
    calls = []
    original = fewshot.maml.run_tasks_on_threads
    monkeypatch.setattr(fewshot.maml, "run_tasks_on_threads",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


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
def test_threads_give_the_loops_values_and_meta_gradients(first_order, steps, threaded_calls):
    loop = results("loop", steps=steps, first_order=first_order)
    assert threaded_calls == []
    threads = results("threads", steps=steps, first_order=first_order)
    assert threaded_calls == [1]
    torch.testing.assert_close(threads[0], loop[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(threads[1], loop[1], rtol=0, atol=0)
    assert threads[2].keys() == loop[2].keys()
    for key in loop[2]:
        torch.testing.assert_close(threads[2][key], loop[2][key], rtol=1e-12, atol=1e-15)
    assert relative_error(threads[3], loop[3]) < 1e-12


def test_threads_pass_gradients_to_learned_rates(threaded_calls):
    model = tiny_model()
    lr = {name: torch.full((2,), 0.3, dtype=torch.float64, requires_grad=True)
          for name, _ in model.named_parameters()}
    loop, threads = (results(batching, model=model, lr=lr) for batching in ("loop", "threads"))
    assert relative_error(threads[3], loop[3]) < 1e-12
    assert all(g.abs().sum() > 0 for g in threads[3][-len(lr):])
    assert threaded_calls == [1]


def test_frozen_parameters_get_no_gradient_on_threads(threaded_calls):
    model = tiny_model()
    frozen = {name for name, _ in model.named_parameters() if name.startswith("features.blocks.0")}
    outcomes = []
    for batching in ("loop", "threads"):
        params = {name: p.detach().requires_grad_(name not in frozen)
                  for name, p in model.named_parameters()}
        losses, _, _ = meta_batch_metrics(model, params, random_episodes(), steps=2, lr=0.4,
                                          batching=batching)
        trained = [p for p in params.values() if p.requires_grad]
        outcomes.append(torch.autograd.grad(losses.sum(), trained))
    names = [name for name in params if name not in frozen]
    for name, loop, threads in zip(names, *outcomes, strict=True):
        torch.testing.assert_close(threads, loop, rtol=1e-10, atol=1e-14, msg=name)
    assert threaded_calls == [1]


def test_mamlpp_with_per_step_batch_norm_statistics_on_threads(threaded_calls):
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
    assert len(threaded_calls) == 2


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


def test_without_gradients_the_workers_build_no_graph():
    grad_modes = []
    def run_task(model, differentiable, task):
        grad_modes.append(torch.is_grad_enabled())
        return (differentiable * task[0]).sum().unsqueeze(0)
    weight = torch.ones(3, requires_grad=True)
    with torch.no_grad():
        out = run_tasks_on_threads(run_task, torch.nn.Identity(), weight, [torch.ones(4, 3)])
    assert grad_modes == [False] * 4 and not out.requires_grad
    model = tiny_model()
    with torch.no_grad():
        losses, _, _, = meta_batch_metrics(model, dict(model.named_parameters()),
                                           random_episodes(), steps=1, lr=0.4, batching="threads")
    loop, _, _ = meta_batch_metrics(model, dict(model.named_parameters()),
                                    random_episodes(), steps=1, lr=0.4, batching="loop")
    torch.testing.assert_close(losses, loop.detach(), rtol=1e-12, atol=0)


def test_a_pending_backward_survives_meta_batches_of_other_sizes(threaded_calls):
    model = tiny_model()
    params = dict(model.named_parameters())
    first, _, _ = meta_batch_metrics(model, params, random_episodes(tasks=5), steps=1, lr=0.4,
                                     batching="threads")
    torch.set_num_threads(3)  # another pool size in between
    other, _, _ = meta_batch_metrics(model, params, random_episodes(tasks=3), steps=1, lr=0.4,
                                     batching="threads")
    torch.set_num_threads(2)
    assert len(threaded_calls) == 2
    expected, _, _ = meta_batch_metrics(model, params, random_episodes(tasks=5), steps=1, lr=0.4,
                                        batching="loop")
    grads = torch.autograd.grad(first.sum(), list(params.values()))
    assert relative_error(grads, torch.autograd.grad(expected.sum(), list(params.values()))) < 1e-12
    torch.autograd.grad(other.sum(), list(params.values()))


def test_threads_started_later_get_the_process_thread_count():
    run_tasks_on_threads(lambda m, d, t: (d * t[0]).sum().unsqueeze(0), torch.nn.Identity(),
                         torch.ones(2), [torch.ones(4, 2)])
    seen = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [2]


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


@pytest.mark.parametrize("situation", ["vmap", "autocast", "checkpoint", "budget", "one thread",
                                       "one task", "device mode", "saved tensor hooks",
                                       "images need gradients", "parameter left out"])
def test_threads_fall_back_to_the_loop_where_they_cannot_run(situation, threaded_calls):
    calls = threaded_calls
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
    elif situation == "one thread":
        torch.set_num_threads(1)
        run()
        torch.set_num_threads(2)
    elif situation == "one task":  # fewer tasks than threads: a core would idle
        meta_batch_metrics(model, params, Episodes(*(t[:1] for t in batch)), steps=1, lr=0.4,
                           batching="threads")
    elif situation == "device mode":
        with torch.device("cpu"):
            run()
    elif situation == "saved tensor hooks":
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            run()
    elif situation == "images need gradients":
        images = batch.query_x.clone().requires_grad_()
        losses, _, _ = meta_batch_metrics(model, params, batch._replace(query_x=images), steps=1,
                                          lr=0.4, batching="threads")
        assert torch.autograd.grad(losses.sum(), images)[0].abs().sum() > 0
    else:  # the head's parameters come from the module itself
        losses, _, _ = meta_batch_metrics(
            model, {n: p for n, p in params.items() if not n.startswith("head")}, batch,
            steps=1, lr=0.4, batching="threads")
        assert torch.autograd.grad(losses.sum(), model.head.weight)[0].abs().sum() > 0
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
