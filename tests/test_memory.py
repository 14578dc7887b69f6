"""Memory options and fast paths change memory and speed, never results: float64 equalities."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from test_maml import random_episodes, relative_error, tiny_model

import fewshot.maml
import fewshot.memory
from fewshot.core.episode import Episodes
from fewshot.maml import meta_batch_metrics
from fewshot.execution.memory_budget import CPU_MARGIN, chunk_size_for_budget, measured_chunk_size
from fewshot.models import Conv4
from fewshot.training.module import MetaLearner


def meta_gradient(model, episodes, *, lr=0.4, steps=3, first_order=False, **options):
    params = dict(model.named_parameters())
    inputs = list(params.values()) + (list(lr.values()) if isinstance(lr, dict) else [])
    losses, _, statistics = meta_batch_metrics(model, params, episodes, steps=steps, lr=lr,
                                               first_order=first_order, **options)
    return losses, statistics, torch.autograd.grad(losses[:, -1].mean(), inputs)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
@pytest.mark.parametrize("first_order", [False, True])
def test_checkpointed_inner_steps_give_the_same_gradients(batching, first_order):
    model, episodes = tiny_model(), random_episodes()
    plain = meta_gradient(model, episodes, first_order=first_order, batching=batching)
    checkpointed = meta_gradient(model, episodes, first_order=first_order, batching=batching,
                                 checkpoint_inner_steps=True)
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=1e-12, atol=0)
    assert checkpointed[1].keys() == plain[1].keys()  # inner-gradient norms still reported
    assert relative_error(checkpointed[2], plain[2]) < 1e-12


def test_checkpointed_steps_pass_gradients_to_learned_inner_rates():
    model, episodes = tiny_model(), random_episodes(tasks=2)
    lr = {name: torch.full((3,), 0.3, dtype=torch.float64, requires_grad=True)
          for name, _ in model.named_parameters()}
    plain = meta_gradient(model, episodes, lr=lr, batching="vmap")[2]
    checkpointed = meta_gradient(model, episodes, lr=lr, batching="vmap", checkpoint_inner_steps=True)[2]
    assert relative_error(checkpointed, plain) < 1e-12
    assert all(g.abs().sum() > 0 for g in checkpointed[-len(lr):])


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_chunks_recomputed_within_a_budget_give_the_same_gradients(batching, monkeypatch):
    model, episodes = tiny_model(), random_episodes(tasks=3)
    plain = meta_gradient(model, episodes, batching=batching)
    chunks = []
    recompute = fewshot.maml.recompute
    monkeypatch.setattr(fewshot.maml, "recompute",
                        lambda fn, d, c: chunks.append(c[0].shape[0]) or recompute(fn, d, c))
    bounded = meta_gradient(model, episodes, batching=batching, memory_budget=1e9, chunk_size=2)
    assert chunks == [2, 1]
    torch.testing.assert_close(bounded[0], plain[0], rtol=1e-12, atol=0)
    assert relative_error(bounded[2], plain[2]) < 1e-12
    both = meta_gradient(model, episodes, batching=batching, memory_budget=1e9, chunk_size=2,
                         checkpoint_inner_steps=True)
    assert relative_error(both[2], plain[2]) < 1e-12


def test_the_budget_sets_the_chunk_from_two_measured_tasks(monkeypatch):
    model, episodes = tiny_model(), random_episodes(tasks=5)
    measured = []
    monkeypatch.setattr(fewshot.memory, "_PER_TASK_BYTES", {})
    monkeypatch.setattr(fewshot.memory, "peak_bytes",
                        lambda work, device: measured.append(work()) or 2000.0)  # 2 tasks
    chunks = []
    recompute = fewshot.maml.recompute
    monkeypatch.setattr(fewshot.maml, "recompute",
                        lambda fn, d, c: chunks.append(c[0].shape[0]) or recompute(fn, d, c))
    plain = meta_gradient(model, episodes, batching="vmap")
    for _ in range(2):  # measured once per configuration
        bounded = meta_gradient(model, episodes, batching="vmap", memory_budget=2000 / CPU_MARGIN + 1,
                                chunk_size="auto")
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
    monkeypatched = measured_chunk_size(("test", object()), lambda n: None, torch.device("meta"),
                                        gib, tasks=7)
    assert monkeypatched == 7


def test_chunk_size_auto_needs_a_budget():
    model, episodes = tiny_model(), random_episodes(tasks=2)
    with pytest.raises(ValueError, match="memory_budget"):
        meta_gradient(model, episodes, batching="vmap", chunk_size="auto")
    with pytest.raises(ValueError, match="memory_budget_gib"):
        MetaLearner(chunk_size="auto")


def learner(**options) -> MetaLearner:
    torch.manual_seed(0)
    return MetaLearner(backbone=Conv4(1, 4, 16), ways=3, inner_steps=2, **options)


def test_meta_learner_memory_options_keep_the_meta_gradient():
    batch = random_episodes(tasks=3, ways=3)
    def gradient(model):
        model = model.double()
        loss, _, _ = model.meta_loss(batch, epoch=0)
        return torch.autograd.grad(loss, list(model.network.parameters()))
    plain = gradient(learner())
    bounded = gradient(learner(memory_budget_gib=1.0, chunk_size=2, checkpoint_inner_steps=True))
    assert relative_error(bounded, plain) < 1e-12


def test_bf16_mixed_precision_trains_on_cpu_through_the_functional_core(tmp_path):
    # Lightning's bf16-mixed runs training_step under CPU autocast; the master weights stay fp32.
    g = torch.Generator().manual_seed(0)
    batches = [Episodes(torch.rand(2, 3, 1, 16, 16, generator=g), torch.arange(3).repeat(2, 1),
                        torch.rand(2, 6, 1, 16, 16, generator=g), torch.arange(3).repeat(2, 2))
               for _ in range(3)]
    model = learner(checkpoint_inner_steps=True)
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    original = model.meta_loss
    def spy(episodes, epoch):
        loss, metrics, first_order = original(episodes, epoch)
        seen.append((torch.is_autocast_enabled("cpu"), loss.dtype))
        return loss, metrics, first_order
    model.meta_loss = spy
    trainer = Trainer(max_steps=3, precision="bf16-mixed", accelerator="cpu", logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert seen and all(autocast for autocast, _ in seen)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
