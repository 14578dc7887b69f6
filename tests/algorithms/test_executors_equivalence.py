"""Executors change speed and memory, never results: for every algorithm and every executor,
the meta-loss, the meta-gradient (network parameters and the algorithm's own) and the recorded
batch-norm statistics equal the per-task loop's, in float64, within 1e-10 relative."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from episodes_for_tests import at_least_two_threads, meta_gradient, random_episodes

import fewshot.execution.memory_budget as memory_budget
import fewshot.execution.threads as threads
from fewshot.algorithms import ANIL, MAML, Algorithm, MAMLPlusPlus, MetaSGD, ProtoNet, Reptile
from fewshot.core.inner_optimizers import Adam, InnerOptimizer
from fewshot.execution import (
    Executor,
    Loop,
    MemoryBudget,
    RecomputeInnerSteps,
    Threads,
    Vmap,
    run_meta_batch,
)
from fewshot.models import Conv4, FewShotClassifier

TASKS = 3
EPOCH = 1  # MAML++: multi-step loss weights no longer uniform, second order (see below)

ALGORITHMS: dict[str, Callable[[], tuple[Algorithm, InnerOptimizer | None]]] = {
    "maml_second_order": lambda: (MAML(inner_steps=2, inner_lr=0.25), None),
    "maml_first_order": lambda: (MAML(inner_steps=2, inner_lr=0.25, first_order=True), None),
    "mamlpp_per_step_running": lambda: (MAMLPlusPlus(
        inner_steps=2, inner_lr=0.25, multi_step_loss_epochs=3, first_order_epochs=1,
        batch_norm="per_step_running"), None),
    "meta_sgd": lambda: (MetaSGD(inner_steps=2, inner_lr=0.25), None),
    "anil_per_entry_adam": lambda: (ANIL(inner_steps=2, inner_lr=0.01, learned_rates="per_entry"),
                                    Adam()),
    "reptile": lambda: (Reptile(inner_steps=2, inner_lr=0.25), None),
    "protonet": lambda: (ProtoNet(), None),
}

EXECUTORS: dict[str, Callable[[], Executor]] = {
    "vmap": Vmap,
    "threads": Threads,
    "memory_budget_loop_chunks_of_2": lambda: MemoryBudget(1.0, chunk_size=2, executor=Loop()),
    "recompute_inner_steps_loop": lambda: RecomputeInnerSteps(Loop()),
    "recompute_inner_steps_vmap": lambda: RecomputeInnerSteps(Vmap()),
}


@pytest.fixture
def float64():
    """Float64 by default, so that everything ``build`` creates (learned rates, per-step batch
    norm) is float64 too; restored afterwards."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def built(name: str) -> tuple[FewShotClassifier, Algorithm]:
    torch.manual_seed(0)
    network = FewShotClassifier(Conv4(in_channels=1, hidden_channels=4, image_size=16), ways=3)
    algorithm, inner_optimizer = ALGORITHMS[name]()
    algorithm.build(network, inner_optimizer)
    with torch.no_grad():  # nothing left at a symmetric value: every path has work to do
        for parameter_name, p in network.named_parameters():
            if p.dim() == 1 or "blocks.1." in parameter_name:
                p.add_(0.3 * torch.randn_like(p))
        for rates in algorithm.meta_parameters().values():
            rates.mul_(torch.empty_like(rates).uniform_(0.5, 1.5))
    assert all(p.dtype == torch.float64 for p in [*network.parameters(), *network.buffers(),
                                                   *algorithm.parameters()])
    return network, algorithm


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.norm().item()
    return (actual - expected).norm().item() / (scale if scale > 0 else 1.0)


def assert_same(actual, expected, where: str) -> None:
    (loss, results, grads), (ref_loss, ref_results, ref_grads) = actual, expected
    assert relative(loss, ref_loss) < 1e-10, where
    for field in ("objective", "losses", "accuracies"):
        assert getattr(results, field).shape == getattr(ref_results, field).shape, (where, field)
        assert relative(getattr(results, field).detach(), getattr(ref_results, field).detach()) < 1e-10
    assert grads.keys() == ref_grads.keys(), where
    flat = torch.cat([g.flatten() for g in grads.values()])
    ref_flat = torch.cat([g.flatten() for g in ref_grads.values()])
    assert ref_flat.norm() > 0 and relative(flat, ref_flat) < 1e-10, where
    for name, ref in ref_grads.items():  # each tensor, up to rounding noise of the whole
        assert (grads[name] - ref).norm() <= 1e-10 * max(ref.norm(), 1e-3 * ref_flat.norm()), \
            (where, name)
    statistics, ref_statistics = results.batch_norm_statistics, ref_results.batch_norm_statistics
    assert statistics.keys() == ref_statistics.keys(), where
    for key, ref in ref_statistics.items():
        assert statistics[key].shape == ref.shape and relative(statistics[key], ref) < 1e-10, \
            (where, key)


@pytest.mark.parametrize("executor_name", list(EXECUTORS))
@pytest.mark.parametrize("algorithm_name", list(ALGORITHMS))
def test_meta_loss_gradient_and_statistics_equal_the_loops(algorithm_name, executor_name,
                                                          float64, monkeypatch):
    episodes = random_episodes(tasks=TASKS, ways=3, shots=1, queries=2)
    network, algorithm = built(algorithm_name)
    reference = meta_gradient(algorithm, network, episodes, Loop(), epoch=EPOCH)

    ran = []  # the executor must really run its strategy, not give way to the loop
    monkeypatch.setattr(threads, "run_tasks_on_threads",
                        lambda *args, _run=threads.run_tasks_on_threads: ran.append("threads")
                        or _run(*args))
    monkeypatch.setattr(memory_budget, "recompute",
                        lambda fn, d, c, _run=memory_budget.recompute: ran.append(c[0].shape[0])
                        or _run(fn, d, c))
    with at_least_two_threads():
        result = meta_gradient(algorithm, network, episodes, EXECUTORS[executor_name](), epoch=EPOCH)
    assert_same(result, reference, f"{algorithm_name} / {executor_name}")
    if executor_name == "threads":
        assert ran == ["threads"]
    elif executor_name.startswith("memory_budget"):
        assert ran == [2, 1]  # chunks of 2 and 1 tasks, each recomputed

    if algorithm_name == "mamlpp_per_step_running":
        # Second order with a weighted multi-step loss at this epoch, and statistics recorded.
        assert not algorithm.first_order_at(EPOCH) and algorithm.every_step_at(EPOCH)
        assert reference[1].objective.shape == (TASKS, 3)
        assert any(key.endswith("/2/var") for key in reference[1].batch_norm_statistics)
    if algorithm.meta_parameters():
        assert any(name.startswith("algorithm.") and g.abs().sum() > 0
                   for name, g in reference[2].items())


@pytest.mark.parametrize("executor_name", list(EXECUTORS))
@pytest.mark.parametrize("algorithm_name", ["mamlpp_per_step_running", "anil_per_entry_adam",
                                            "reptile", "protonet"])
def test_evaluation_scores_equal_the_loops(algorithm_name, executor_name, float64):
    episodes = random_episodes(tasks=TASKS, ways=3, shots=1, queries=2)
    network, algorithm = built(algorithm_name)
    network.eval()  # MAML++: predictions with the per-step running statistics
    reference = run_meta_batch(algorithm, network, episodes, Loop(), training=False)
    with at_least_two_threads():
        results = run_meta_batch(algorithm, network, episodes, EXECUTORS[executor_name](),
                                 training=False)
    assert results.losses.shape == (TASKS, algorithm.evaluation_steps + 1)
    assert relative(results.losses, reference.losses) < 1e-10
    assert torch.equal(results.accuracies, reference.accuracies)
