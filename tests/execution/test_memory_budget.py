"""Memory executors (recomputed inner steps, a memory budget) change memory and speed, never
results: float64 equalities."""

from __future__ import annotations

import pytest
import torch
from episodes_for_tests import random_episodes, relative_error, tiny_model
from lightning.pytorch import Trainer

import fewshot.execution.memory_budget
from fewshot.algorithms import MAML
from fewshot.core.episode import Episodes
from fewshot.execution import Loop, MemoryBudget, RecomputeInnerSteps, Vmap, run_meta_batch
from fewshot.execution.memory_budget import (
    CPU_MARGIN,
    chunk_size_for_budget,
    measured_chunk_size,
)
from fewshot.models import Conv4
from fewshot.training.module import MetaLearner

EXECUTORS = {"vmap": Vmap, "loop": Loop}


def meta_gradient(model, episodes, executor, *, steps=3, first_order=False, inner_lr=0.4,
                  learned_rates="none"):
    """Query losses ``[T, 1]``, per-task diagnostics and the meta-gradient (network
    parameters, then learned rates) of MAML run by ``executor``."""
    maml = MAML(inner_steps=steps, inner_lr=inner_lr, first_order=first_order,
                learned_rates=learned_rates)
    maml.build(model)
    maml.double()  # learned rates are created in the default dtype
    inputs = list(model.parameters()) + list(maml.meta_parameters().values())
    results = run_meta_batch(maml, model, episodes, executor)
    return results.objective, results.diagnostics, torch.autograd.grad(
        maml.meta_loss(results, epoch=0), inputs)


@pytest.fixture
def chunks(monkeypatch):
    """The size of every chunk of tasks recomputed by a memory budget."""
    sizes = []
    recompute = fewshot.execution.memory_budget.recompute
    monkeypatch.setattr(fewshot.execution.memory_budget, "recompute",
                        lambda fn, d, c: sizes.append(c[0].shape[0]) or recompute(fn, d, c))
    return sizes


@pytest.mark.parametrize("executor", ["vmap", "loop"])
@pytest.mark.parametrize("first_order", [False, True])
def test_recomputed_inner_steps_give_the_same_gradients(executor, first_order):
    model, episodes = tiny_model(), random_episodes()
    plain = meta_gradient(model, episodes, EXECUTORS[executor](), first_order=first_order)
    recomputed = meta_gradient(model, episodes, RecomputeInnerSteps(EXECUTORS[executor]()),
                               first_order=first_order)
    torch.testing.assert_close(recomputed[0], plain[0], rtol=1e-12, atol=0)
    assert recomputed[1].keys() == plain[1].keys() and plain[1]  # inner-gradient norms reported
    for key, value in plain[1].items():
        torch.testing.assert_close(recomputed[1][key], value, rtol=1e-12, atol=1e-15)
    assert relative_error(recomputed[2], plain[2]) < 1e-12


def test_recomputed_steps_pass_gradients_to_learned_inner_rates():
    model, episodes = tiny_model(), random_episodes(tasks=2)
    rates = len(list(model.parameters()))
    options = dict(inner_lr=0.3, learned_rates="per_tensor")
    plain = meta_gradient(model, episodes, Vmap(), **options)[2]
    recomputed = meta_gradient(model, episodes, RecomputeInnerSteps(Vmap()), **options)[2]
    assert len(plain) == 2 * rates  # the network's parameters, then one rate tensor each
    assert relative_error(recomputed, plain) < 1e-12
    assert all(g.abs().sum() > 0 for g in recomputed[-rates:])


def test_recompute_inner_steps_asks_the_algorithm_for_checkpointed_steps():
    assert RecomputeInnerSteps().checkpoint_inner_steps
    assert not Loop().checkpoint_inner_steps and not MemoryBudget(1.0).checkpoint_inner_steps
    assert MemoryBudget(1.0, executor=RecomputeInnerSteps(Loop())).checkpoint_inner_steps


@pytest.mark.parametrize("executor", ["vmap", "loop"])
def test_chunks_recomputed_within_a_budget_give_the_same_gradients(executor, chunks):
    model, episodes = tiny_model(), random_episodes(tasks=3)
    plain = meta_gradient(model, episodes, EXECUTORS[executor]())
    bounded = meta_gradient(model, episodes,
                            MemoryBudget(1.0, chunk_size=2, executor=EXECUTORS[executor]()))
    assert chunks == [2, 1]
    torch.testing.assert_close(bounded[0], plain[0], rtol=1e-12, atol=0)
    assert relative_error(bounded[2], plain[2]) < 1e-12
    both = meta_gradient(model, episodes, MemoryBudget(
        1.0, chunk_size=2, executor=RecomputeInnerSteps(EXECUTORS[executor]())))
    assert chunks == [2, 1, 2, 1]
    assert relative_error(both[2], plain[2]) < 1e-12


def test_a_budget_that_holds_every_task_recomputes_nothing(chunks):
    model, episodes = tiny_model(), random_episodes(tasks=3)
    plain = meta_gradient(model, episodes, Loop())
    whole = meta_gradient(model, episodes, MemoryBudget(1.0, chunk_size=3, executor=Loop()))
    assert chunks == []
    assert relative_error(whole[2], plain[2]) < 1e-12


def test_the_budget_sets_the_chunk_from_two_measured_tasks(monkeypatch, chunks):
    model, episodes = tiny_model(), random_episodes(tasks=5)
    measured = []
    monkeypatch.setattr(fewshot.execution.memory_budget, "_PER_TASK_BYTES", {})
    monkeypatch.setattr(fewshot.execution.memory_budget, "peak_bytes",
                        lambda work, device: measured.append(work()) or 2000.0)  # 2 tasks
    plain = meta_gradient(model, episodes, Vmap())
    budget_gib = (2000 / CPU_MARGIN + 1) / 2**30
    for _ in range(2):  # measured once per configuration
        bounded = meta_gradient(model, episodes, MemoryBudget(budget_gib, executor=Vmap()))
        assert relative_error(bounded[2], plain[2]) < 1e-12
    assert len(measured) == 1  # (after one warm-up run)
    # 1000 bytes per task: a budget of 2000 / CPU_MARGIN holds two.
    assert chunks == [2, 2, 1] * 2


def test_chunk_size_for_budget():
    gib = 2**30
    assert chunk_size_for_budget(10 * gib, gib, tasks=32) == 9  # 90% of the budget
    assert chunk_size_for_budget(100 * gib, gib, tasks=32) == 32
    assert chunk_size_for_budget(10 * gib, gib, tasks=32, margin=0.7) == 7
    assert chunk_size_for_budget(gib, 0, tasks=4) == 4
    with pytest.raises(MemoryError, match="cannot hold one task"):
        chunk_size_for_budget(gib, 2 * gib, tasks=4)
    # Unmeasurable (no CUDA, not Linux): everything in one chunk.
    unmeasurable = measured_chunk_size(("test", object()), lambda n: None, torch.device("meta"),
                                       gib, tasks=7)
    assert unmeasurable == 7


def test_memory_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="budget_gib"):
        MemoryBudget(0)
    with pytest.raises(ValueError, match="chunk_size"):
        MemoryBudget(1.0, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        Vmap(chunk_size="auto")  # the chunk of a budget is MemoryBudget's, not vmap's
    with pytest.raises(ValueError, match="budget_gib"):
        MetaLearner(executor={"class_path": "fewshot.execution.memory_budget.MemoryBudget",
                              "init_args": {"budget_gib": -1.0}})


def learner(executor=None) -> MetaLearner:
    torch.manual_seed(0)
    return MetaLearner(backbone=Conv4(1, 4, 16), ways=3, algorithm=MAML(inner_steps=2),
                       executor=executor)


def test_meta_learner_memory_executors_keep_the_meta_gradient():
    batch = random_episodes(tasks=3, ways=3)
    def gradient(model):
        model = model.double()
        loss, _ = model.meta_loss(batch, epoch=0)
        return torch.autograd.grad(loss, list(model.network.parameters()))
    plain = gradient(learner(Loop()))
    bounded = gradient(learner(MemoryBudget(1.0, chunk_size=2, executor=RecomputeInnerSteps())))
    assert relative_error(bounded, plain) < 1e-12
    # The same executor as a checkpoint records it.
    recorded = learner(MemoryBudget(1.0, chunk_size=2, executor=RecomputeInnerSteps()))
    settings = recorded.hparams["executor"]
    assert settings["init_args"]["executor"]["class_path"].endswith("RecomputeInnerSteps")
    rebuilt = learner(settings)
    assert isinstance(rebuilt.executor, MemoryBudget) and rebuilt.executor.chunk_size == 2
    assert relative_error(gradient(rebuilt), plain) < 1e-12


def test_bf16_mixed_precision_trains_on_cpu_through_the_functional_core(tmp_path):
    # Lightning's bf16-mixed runs training_step under CPU autocast; the master weights stay fp32.
    g = torch.Generator().manual_seed(0)
    batches = [Episodes(torch.rand(2, 3, 1, 16, 16, generator=g), torch.arange(3).repeat(2, 1),
                        torch.rand(2, 6, 1, 16, 16, generator=g), torch.arange(3).repeat(2, 2))
               for _ in range(3)]
    model = learner(RecomputeInnerSteps())
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    original = model.meta_loss
    def spy(episodes, epoch=None):
        loss, results = original(episodes, epoch)
        seen.append((torch.is_autocast_enabled("cpu"), loss.dtype))
        return loss, results
    model.meta_loss = spy
    trainer = Trainer(max_steps=3, precision="bf16-mixed", accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert len(seen) == 3 and all(autocast for autocast, _ in seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
