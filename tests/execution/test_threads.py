"""Tasks on worker threads (the ``Threads`` executor): the loop's values and gradients
(float64), one core per worker; where threads cannot run they give way to the loop, and
``Auto`` picks threads, vmap or the loop by device and task size."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from episodes_for_tests import random_episodes, relative_error, tiny_model

import fewshot.execution.threads
from fewshot.algorithms import MAML, MAMLPlusPlus
from fewshot.core.episode import Episodes
from fewshot.execution import (
    Auto,
    Loop,
    MemoryBudget,
    RecomputeInnerSteps,
    Threads,
    Vmap,
    run_meta_batch,
)
from fewshot.execution.auto import CPU_VMAP_MAX_IMAGES_PER_TASK
from fewshot.execution.threads import run_tasks_on_threads, tasks_on_threads_supported
from fewshot.models import Conv4
from fewshot.training.module import MetaLearner


@pytest.fixture(autouse=True)
def two_threads():
    """Two intra-op threads, so that ``Threads`` runs on two workers even on a one-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def threaded_calls(monkeypatch):
    """How many meta-batches went to the worker threads."""
    calls = []
    original = fewshot.execution.threads.run_tasks_on_threads
    monkeypatch.setattr(fewshot.execution.threads, "run_tasks_on_threads",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.fixture
def loop_calls(monkeypatch):
    """How many meta-batches ``Threads`` handed to the loop instead."""
    calls = []

    class CountedLoop(Loop):
        def run(self, *args, **kwargs):
            calls.append(1)
            return super().run(*args, **kwargs)

    monkeypatch.setattr(fewshot.execution.threads, "Loop", CountedLoop)
    return calls


def every_step_maml(steps: int = 2, first_order: bool = False, inner_lr: float = 0.4,
                    learned_rates: str = "none") -> MAMLPlusPlus:
    """MAML scoring the query set after every inner step in training (MAML++ with only the
    multi-step loss on, and learned rates if asked): the results then have a step dimension
    worth routing gradients through."""
    return MAMLPlusPlus(inner_steps=steps, inner_lr=inner_lr, first_order=first_order,
                        learned_rates=learned_rates, multi_step_loss=True,
                        derivative_order_annealing=False, per_step_bn_weights=False,
                        batch_norm="transductive")


def results(executor, algorithm=None, model=None, batch=None):
    model = model or tiny_model()
    batch = batch or random_episodes(tasks=5)
    algorithm = algorithm or every_step_maml()
    algorithm.build(model)
    algorithm.double()  # learned rates are created in the default dtype
    differentiable = list(model.parameters()) + list(algorithm.meta_parameters().values())
    outcome = run_meta_batch(algorithm, model, batch, executor)
    # Weights per task and step: the backward pass must route each task's slice to its worker.
    losses = outcome.objective
    weights = torch.arange(1.0, losses.numel() + 1, dtype=losses.dtype).view_as(losses)
    grads = torch.autograd.grad((losses * weights).sum(), differentiable)
    return outcome, grads


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_threads_give_the_loops_values_and_meta_gradients(first_order, steps, threaded_calls):
    loop, loop_grads = results(Loop(), every_step_maml(steps, first_order))
    assert threaded_calls == []
    threads, grads = results(Threads(), every_step_maml(steps, first_order))
    assert threaded_calls == [1]
    assert threads.objective.shape == (5, steps + 1)
    torch.testing.assert_close(threads.objective, loop.objective, rtol=1e-12, atol=0)
    torch.testing.assert_close(threads.losses, loop.losses, rtol=1e-12, atol=0)
    torch.testing.assert_close(threads.accuracies, loop.accuracies, rtol=0, atol=0)
    assert threads.diagnostics.keys() == loop.diagnostics.keys() and loop.diagnostics
    for key in loop.diagnostics:
        torch.testing.assert_close(threads.diagnostics[key], loop.diagnostics[key],
                                   rtol=1e-12, atol=1e-15)
    assert relative_error(grads, loop_grads) < 1e-12


def test_threads_pass_gradients_to_learned_rates(threaded_calls):
    model = tiny_model()
    (_, loop), (_, threads) = (
        results(executor, every_step_maml(2, inner_lr=0.3, learned_rates="per_tensor"), model)
        for executor in (Loop(), Threads()))
    rates = len(dict(model.named_parameters()))
    assert relative_error(threads, loop) < 1e-12
    assert all(g.abs().sum() > 0 for g in threads[-rates:])
    assert threaded_calls == [1]


def test_frozen_parameters_get_no_gradient_on_threads(threaded_calls):
    model = tiny_model()
    frozen = {name for name, _ in model.named_parameters() if name.startswith("features.blocks.0")}
    outcomes = []
    for executor in (Loop(), Threads()):
        params = {name: p.detach().requires_grad_(name not in frozen)
                  for name, p in model.named_parameters()}
        maml = MAML(inner_steps=2, inner_lr=0.4)
        maml.build(model)
        outcome = run_meta_batch(maml, model, random_episodes(), executor, params=params)
        trained = [p for p in params.values() if p.requires_grad]
        outcomes.append(torch.autograd.grad(outcome.objective.sum(), trained))
    names = [name for name in params if name not in frozen]
    for name, loop, threads in zip(names, *outcomes, strict=True):
        torch.testing.assert_close(threads, loop, rtol=1e-10, atol=1e-14, msg=name)
    assert threaded_calls == [1]


def mamlpp_learner(executor) -> MetaLearner:
    torch.manual_seed(0)
    algorithm = MAMLPlusPlus(inner_steps=2, inner_lr=0.25, multi_step_loss=True,
                             multi_step_loss_epochs=3, derivative_order_annealing=True,
                             first_order_epochs=2, learned_rates="per_tensor",
                             per_step_bn_weights=True, batch_norm="per_step_running")
    return MetaLearner(backbone=Conv4(1, 4, 16), ways=3, algorithm=algorithm,
                       executor=executor).double()


def test_mamlpp_with_per_step_batch_norm_statistics_on_threads(threaded_calls):
    batch = random_episodes(tasks=4, shots=1)
    models = {name: mamlpp_learner(e) for name, e in (("loop", Loop()), ("threads", Threads()))}
    outcomes = {}
    for name, model in models.items():
        loss, outcome = model.meta_loss(batch, epoch=0)
        params = dict(model.named_parameters())
        outcomes[name] = loss, outcome, dict(zip(params, torch.autograd.grad(
            loss, list(params.values())), strict=True))
    (loop_loss, loop_results, loop_grads), (loss, threaded, grads) = outcomes.values()
    assert any(name.startswith("algorithm.inner_lrs") for name in grads)  # LSLR is on
    assert loss.item() == pytest.approx(loop_loss.item(), rel=1e-12)
    for name, grad in loop_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-10, atol=1e-14, msg=name)
    statistics, loop_statistics = threaded.batch_norm_statistics, loop_results.batch_norm_statistics
    assert any("/1/mean" in key for key in statistics)  # per-step statistics came back by value
    assert statistics.keys() == loop_statistics.keys()
    for key, value in loop_statistics.items():
        assert statistics[key].shape[0] == 4  # one row per task
        torch.testing.assert_close(statistics[key], value, rtol=1e-10, atol=1e-14, msg=key)
    assert len(threaded_calls) == 1


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


def built_maml(model, steps: int = 1) -> MAML:
    maml = MAML(inner_steps=steps, inner_lr=0.4)
    maml.build(model)
    return maml


def test_without_gradients_the_workers_build_no_graph(threaded_calls):
    grad_modes = []
    def run_task(model, differentiable, task):
        grad_modes.append(torch.is_grad_enabled())
        return (differentiable * task[0]).sum().unsqueeze(0)
    weight = torch.ones(3, requires_grad=True)
    with torch.no_grad():
        out = run_tasks_on_threads(run_task, torch.nn.Identity(), weight, [torch.ones(4, 3)])
    assert grad_modes == [False] * 4 and not out.requires_grad
    model = tiny_model()
    maml = built_maml(model)
    with torch.no_grad():
        threaded = run_meta_batch(maml, model, random_episodes(), Threads())
    assert threaded_calls == [1] and not threaded.objective.requires_grad
    loop = run_meta_batch(maml, model, random_episodes(), Loop())
    torch.testing.assert_close(threaded.objective, loop.objective.detach(), rtol=1e-12, atol=0)


def test_evaluation_tasks_on_threads_score_every_step_as_the_loop_does(threaded_calls):
    model, batch = tiny_model(), random_episodes(tasks=4)
    maml = MAML(inner_steps=1, inner_lr=0.4, eval_inner_steps=3)
    maml.build(model)
    loop = run_meta_batch(maml, model, batch, Loop(), training=False)
    threaded = run_meta_batch(maml, model, batch, Threads(), training=False)
    assert threaded_calls == [1]
    assert threaded.losses.shape == (4, 4) and not threaded.losses.requires_grad
    torch.testing.assert_close(threaded.losses, loop.losses, rtol=1e-12, atol=0)
    torch.testing.assert_close(threaded.accuracies, loop.accuracies, rtol=0, atol=0)


def test_a_pending_backward_survives_meta_batches_of_other_sizes(threaded_calls):
    model = tiny_model()
    maml = built_maml(model)
    params = list(model.parameters())
    first = run_meta_batch(maml, model, random_episodes(tasks=5), Threads()).objective
    torch.set_num_threads(3)  # another pool size in between
    other = run_meta_batch(maml, model, random_episodes(tasks=3), Threads()).objective
    torch.set_num_threads(2)
    assert len(threaded_calls) == 2
    expected = run_meta_batch(maml, model, random_episodes(tasks=5), Loop()).objective
    grads = torch.autograd.grad(first.sum(), params)
    assert relative_error(grads, torch.autograd.grad(expected.sum(), params)) < 1e-12
    torch.autograd.grad(other.sum(), params)


def test_threads_started_later_get_the_process_thread_count():
    run_tasks_on_threads(lambda m, d, t: (d * t[0]).sum().unsqueeze(0), torch.nn.Identity(),
                         torch.ones(2), [torch.ones(4, 2)])
    seen = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [2]


def test_a_second_backward_or_a_third_order_gradient_is_refused_by_name(threaded_calls):
    model = tiny_model()
    maml = built_maml(model)
    params = list(model.parameters())
    losses = run_meta_batch(maml, model, random_episodes(), Threads()).objective
    loss = (losses * 2).sum()
    torch.autograd.grad(loss, params, retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(loss, params)
    losses = run_meta_batch(maml, model, random_episodes(), Threads()).objective
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad(losses.sum(), params, create_graph=True)
    assert threaded_calls == [1, 1]


def test_an_error_in_a_task_reaches_the_caller(threaded_calls):
    batch = random_episodes()
    bad = batch._replace(support_y=batch.support_y + 10)  # labels past the head's outputs
    model = tiny_model()
    with pytest.raises(IndexError):
        run_meta_batch(built_maml(model), model, bad, Threads())
    assert threaded_calls == [1]


@pytest.mark.parametrize("situation", ["vmap", "autocast", "recomputed steps", "budget chunks",
                                       "one thread", "one task", "device mode",
                                       "saved tensor hooks", "images need gradients",
                                       "parameter left out"])
def test_threads_fall_back_to_the_loop_where_they_cannot_run(situation, threaded_calls,
                                                             loop_calls):
    model, batch = tiny_model(), random_episodes(tasks=2)
    maml = built_maml(model)
    params = dict(model.named_parameters())

    def run(executor=None, episodes=batch, **options):
        return run_meta_batch(maml, model, episodes, executor or Threads(), **options)

    if situation == "vmap":
        torch.func.vmap(lambda x: run().objective.sum() * x)(torch.ones(2, dtype=torch.float64))
    elif situation == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not tasks_on_threads_supported(torch.device("cpu"))
            run()
    elif situation == "recomputed steps":
        run(RecomputeInnerSteps(Threads()))
    elif situation == "budget chunks":  # each chunk recomputed in the backward pass
        losses = run(MemoryBudget(1.0, chunk_size=1, executor=Threads())).objective
        torch.autograd.grad(losses.sum(), list(params.values()))
    elif situation == "one thread":
        torch.set_num_threads(1)
        run()
        torch.set_num_threads(2)
    elif situation == "one task":  # fewer tasks than threads: a core would idle
        run(episodes=Episodes(*(t[:1] for t in batch)))
    elif situation == "device mode":
        with torch.device("cpu"):
            run()
    elif situation == "saved tensor hooks":
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            run()
    elif situation == "images need gradients":
        images = batch.query_x.clone().requires_grad_()
        losses = run(episodes=batch._replace(query_x=images)).objective
        assert torch.autograd.grad(losses.sum(), images)[0].abs().sum() > 0
    else:  # the head's parameters come from the module itself
        losses = run(params={n: p for n, p in params.items() if not n.startswith("head")}).objective
        assert torch.autograd.grad(losses.sum(), model.head.weight)[0].abs().sum() > 0
    assert threaded_calls == []
    assert loop_calls  # ... but the loop did
    loop_calls.clear()
    run()
    assert threaded_calls == [1] and loop_calls == []  # with nothing in the way: the threads


def test_threads_checks_its_workers():
    assert Threads(workers=3).workers == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="workers"):
            Threads(workers=bad)


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


# -- Auto: threads, vmap or the loop -------------------------------------------------------

def choice(model, batch, **options):
    differentiable = (dict(model.named_parameters()), {})
    return Auto().choose(model, differentiable, batch, **options)


def test_auto_picks_threads_on_a_cpu_with_more_than_one_thread(threaded_calls):
    model, batch = tiny_model(), random_episodes(tasks=4)
    assert isinstance(choice(model, batch), Threads)
    assert Auto().describe(torch.device("cpu"), 10) == "threads"
    maml = built_maml(model)
    auto = run_meta_batch(maml, model, batch, Auto())
    assert threaded_calls == [1]
    loop = run_meta_batch(maml, model, batch, Loop())
    torch.testing.assert_close(auto.objective, loop.objective, rtol=1e-12, atol=0)


@pytest.mark.parametrize("images", [CPU_VMAP_MAX_IMAGES_PER_TASK, CPU_VMAP_MAX_IMAGES_PER_TASK + 2])
def test_auto_on_one_thread_picks_vmap_for_small_tasks_and_the_loop_for_larger(images):
    torch.set_num_threads(1)
    shots = 1
    queries = (images - 3 * shots) // 3
    batch = random_episodes(tasks=4, shots=shots, queries=queries)
    per_task = batch.support_x.shape[1] + batch.query_x.shape[1]
    expected = Vmap if per_task <= CPU_VMAP_MAX_IMAGES_PER_TASK else Loop
    assert isinstance(choice(tiny_model(), batch), expected)
    assert Auto().describe(torch.device("cpu"), per_task) == expected.__name__.lower()


def test_auto_gives_way_to_the_one_thread_choice_where_threads_cannot_run(threaded_calls):
    model, batch = tiny_model(), random_episodes(tasks=1, shots=1, queries=1)  # 6 images
    assert isinstance(choice(model, batch), Vmap)  # one task for two threads
    many = random_episodes(tasks=4, shots=1, queries=1)
    assert isinstance(choice(model, many, recomputing=True), Vmap)
    assert isinstance(choice(model, random_episodes(tasks=4, shots=5, queries=5),
                             recomputing=True), Loop)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert isinstance(choice(model, many), Vmap)
    assert threaded_calls == []


def test_auto_describes_vmap_on_a_gpu():
    assert Auto().describe(torch.device("cuda"), 1000) == "vmap"
    assert Threads().describe(torch.device("cuda"), 10) == "loop"
    assert Threads().describe(torch.device("cpu"), 10) == "threads"



@pytest.mark.parametrize("channels_last", [True, False])
def test_tasks_get_channels_last_weights_and_images_only_when_asked(channels_last):
    seen = []

    def run_task(model, differentiable, task):
        weight, bias = differentiable["weight"], differentiable["bias"]
        seen.append([t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
                     for t in (weight, task[0])] + [bias.is_contiguous()])
        out = torch.nn.functional.conv2d(task[0], weight, bias)
        return out.square().mean().unsqueeze(0)

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, generator=generator, requires_grad=True)
    images = torch.rand(4, 2, 3, 8, 8, dtype=torch.float64, generator=generator)
    losses = run_tasks_on_threads(run_task, torch.nn.Identity(), {"weight": weight, "bias": bias},
                                  [images], None, channels_last)
    assert seen == [[channels_last, channels_last, True]] * 4
    grads = torch.autograd.grad(losses.sum(), [weight, bias])
    expected = torch.autograd.grad(sum(torch.nn.functional.conv2d(x, weight, bias).square().mean()
                                       for x in images), [weight, bias])
    assert relative_error(grads, expected) < 1e-12
    assert Threads(channels_last=channels_last).settings()["init_args"]["channels_last"] is channels_last
    with pytest.raises(ValueError, match="channels_last"):
        Threads(channels_last="yes")
