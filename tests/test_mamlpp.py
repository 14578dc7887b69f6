"""MAML++: every switch changes behaviour, and only its own; all off is plain MAML."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Trainer

from fewshot.core.episode import Episodes
from fewshot.maml import adapt, meta_batch_metrics
from fewshot.algorithms.mamlpp import multi_step_loss_weights, use_first_order
from fewshot.models import Conv4, TransductiveBatchNorm2d
from fewshot.core.step_context import inner_step
from fewshot.models.per_step_batch_norm import PerStepBatchNorm2d
from fewshot.training.module import MetaLearner

ALL_ON = dict(multi_step_loss=True, multi_step_loss_epochs=3, derivative_order_annealing=True,
              first_order_epochs=2, learn_inner_lr=True, per_step_bn_weights=True,
              batch_norm="per_step_running", cosine_annealing=True)


def learner(seed: int = 0, **switches) -> MetaLearner:
    torch.manual_seed(seed)
    options = dict(backbone=Conv4(1, 4, 16), ways=3, inner_steps=2, inner_lr=0.25)  # exact in float32 (LSLR)
    options.update(switches)
    return MetaLearner(**options).double()


def episodes(tasks: int = 2, queries: int = 2) -> Episodes:
    g = torch.Generator().manual_seed(1)
    return Episodes(torch.rand(tasks, 3, 1, 16, 16, generator=g, dtype=torch.float64),
                    torch.arange(3).repeat(tasks, 1),
                    torch.rand(tasks, 3 * queries, 1, 16, 16, generator=g, dtype=torch.float64),
                    torch.arange(3).repeat_interleave(queries).repeat(tasks, 1))


def meta_gradient(model: MetaLearner, batch: Episodes, epoch: int = 0):
    loss, _, _ = model.meta_loss(batch, epoch)
    params = dict(model.network.named_parameters())
    return loss, dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


def plain_maml(model: MetaLearner, batch: Episodes, adapt_batch_norm: bool = True):
    params = dict(model.network.named_parameters())
    lr = 0.25
    if not adapt_batch_norm:  # per-name rates: zero for the batch-norm affine parameters
        def is_norm(name: str) -> bool:
            return isinstance(model.network.get_submodule(name.rpartition(".")[0]),
                              TransductiveBatchNorm2d)
        lr = {n: torch.tensor([0.0 if is_norm(n) else 0.25], dtype=torch.float64) for n in params}
    losses, _, _ = meta_batch_metrics(model.network, params, batch, steps=2, lr=lr, batching="loop")
    loss = losses[:, -1].mean()
    return loss, dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


# -- schedules -----------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [1, 2, 5])
def test_msl_weights_sum_to_one_and_anneal_to_the_last_step(steps):
    epochs = 10
    history = [multi_step_loss_weights(steps, e, epochs) for e in range(epochs + 2)]
    for weights in history:
        assert weights.shape == (steps,) and weights.sum().item() == pytest.approx(1.0)
    assert torch.allclose(history[0], torch.full((steps,), 1 / steps))
    assert history[epochs].tolist() == [0.0] * (steps - 1) + [1.0]
    if steps > 1:
        finals = [w[-1].item() for w in history]
        assert finals == sorted(finals)  # the last step gains importance monotonically
        assert min(w[:-1].min().item() for w in history[:epochs]) >= 0.03 / steps - 1e-9
        # decay of 1/(steps*epochs) per epoch: at epoch 1, 1/steps - 1/(steps*10)
        assert history[1][0].item() == pytest.approx(1 / steps - 1 / (steps * epochs))


def test_derivative_order_annealing_switches_at_the_configured_epoch():
    assert [use_first_order(e, False, True, 3) for e in range(5)] == [True] * 3 + [False] * 2
    assert not any(use_first_order(e, False, False, 3) for e in range(5))
    assert all(use_first_order(e, True, False, 3) for e in range(5))


def test_cosine_annealing_schedule_values(tmp_path):
    model = learner(cosine_annealing=True, meta_lr=1e-3, min_meta_lr=1e-5).float()
    trainer = Trainer(max_steps=10, default_root_dir=tmp_path, logger=False)
    model.trainer = trainer
    config = model.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    for step in range(11):
        expected = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * step / 10)) / 2
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
        optimizer.step()
        schedule.step()


def test_cosine_annealing_needs_a_run_length(tmp_path):
    model = learner(cosine_annealing=True)
    model.trainer = Trainer(max_time="00:00:01:00", default_root_dir=tmp_path, logger=False)
    with pytest.raises(ValueError, match="max_steps"):
        model.configure_optimizers()


# -- equivalences --------------------------------------------------------------------------

def test_all_switches_off_is_plain_maml():
    model, batch = learner(), episodes()
    loss, grads = meta_gradient(model, batch)
    ref_loss, ref_grads = plain_maml(model, batch)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12)


def test_lslr_starts_as_plain_maml():
    # The rates start at inner_lr: before any training LSLR computes plain MAML.
    model, batch = learner(learn_inner_lr=True), episodes()
    loss, _ = meta_gradient(model, batch)
    assert loss.item() == pytest.approx(plain_maml(learner(), batch)[0].item(), rel=1e-12)


def test_bnwb_starts_as_maml_with_batch_norm_meta_learned_only():
    # Every slot starts from the shared affine values, and slot k serves only the forward
    # passes after k updates, so the inner loop's update of slot k is never used: per-step
    # weights are meta-learned, not adapted (as in MAML++).
    model, batch = learner(per_step_bn_weights=True), episodes()
    loss, _ = meta_gradient(model, batch)
    frozen, _ = plain_maml(learner(), batch, adapt_batch_norm=False)
    adapted, _ = plain_maml(learner(), batch)
    assert loss.item() == pytest.approx(frozen.item(), rel=1e-12)
    assert loss.item() != pytest.approx(adapted.item(), rel=1e-6)


def test_msl_changes_only_the_loss_weighting():
    batch = episodes()
    model = learner(multi_step_loss=True, multi_step_loss_epochs=4)
    loss, metrics, _ = model.meta_loss(batch, epoch=0)
    assert metrics.losses.shape == (2, 3)  # before and after each of the 2 steps
    assert loss.item() == pytest.approx(metrics.losses[:, 1:].mean().item())  # uniform at epoch 0
    after, _, _ = model.meta_loss(batch, epoch=4)
    assert after.item() == pytest.approx(plain_maml(learner(), batch)[0].item(), rel=1e-12)


def test_da_is_first_order_before_the_epoch_and_second_order_after():
    batch = episodes()
    model = learner(derivative_order_annealing=True, first_order_epochs=2)
    _, early = meta_gradient(model, batch, epoch=1)
    _, late = meta_gradient(model, batch, epoch=2)
    _, first = meta_gradient(learner(first_order=True), batch)
    _, second = plain_maml(learner(), batch)
    for name in early:
        torch.testing.assert_close(early[name], first[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(late[name], second[name], rtol=1e-10, atol=1e-12)


def test_lslr_rates_get_meta_gradients_and_are_used_per_step_and_layer():
    model, batch = learner(learn_inner_lr=True), episodes()
    loss, _, _ = model.meta_loss(batch, 0)
    loss.backward()
    assert len(model.inner_lrs) == len(list(model.network.parameters()))
    assert all(r.shape == (2,) and r.grad is not None and r.grad.abs().sum() > 0
               for r in model.inner_lrs.values())
    # Per step and layer: zero the head's rate at step 1 only; the head then moves at step 0
    # and stays put at step 1, while the other layers move at both steps.
    with torch.no_grad():
        model.inner_lrs["head-weight"][1] = 0.0
    params = {n: p.detach() for n, p in model.network.named_parameters()}
    rates = model._inner_lr(training=True, detach=True)
    sx, sy = batch.support_x[0], batch.support_y[0]
    one = adapt(model.network, params, sx, sy, steps=1, lr=rates)
    two = adapt(model.network, params, sx, sy, steps=2, lr=rates)
    assert not torch.equal(one["head.weight"], params["head.weight"])
    assert torch.equal(two["head.weight"], one["head.weight"])
    assert not torch.equal(two["head.bias"], one["head.bias"])


def test_per_step_bn_parameters_are_indexed_by_step():
    layer = PerStepBatchNorm2d(2, slots=3, per_step_affine=True).double()
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]))
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    outputs = []
    for step in range(5):
        with inner_step(step):
            outputs.append(layer(x))
    assert torch.allclose(outputs[1] - outputs[0], torch.ones_like(x))
    assert torch.allclose(outputs[2] - outputs[0], 2 * torch.ones_like(x))
    assert torch.equal(outputs[4], outputs[2])  # steps past the last slot reuse it
    with inner_step(1):
        layer(x).sum().backward()
    assert layer.bias.grad[1].abs().sum() > 0 and layer.bias.grad[[0, 2]].abs().sum() == 0


@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_and_loop_agree_with_every_switch_on(first_order):
    batch = episodes(tasks=3)
    results = {}
    for batching in ("vmap", "loop"):
        model = learner(batching=batching, first_order=first_order, **ALL_ON)
        loss, metrics, _ = model.meta_loss(batch, epoch=2)  # MSL on, second order (if allowed)
        params = [p for p in model.parameters()]
        results[batching] = (loss, torch.autograd.grad(loss, params), metrics.statistics)
    (l1, g1, s1), (l2, g2, s2) = results["vmap"], results["loop"]
    assert l1.item() == pytest.approx(l2.item(), rel=1e-12)
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert s1.keys() == s2.keys() and any(k.endswith("/mean") for k in s1)
    for key in s1:
        torch.testing.assert_close(s1[key], s2[key])


# -- batch-norm modes ----------------------------------------------------------------------

def query_logits_after_adapting(model: MetaLearner, support, query) -> torch.Tensor:
    params = model.adapt(*support)
    return model.predict_logits(params, query)


@pytest.mark.parametrize("mode", ["transductive", "per_step_running"])
def test_leakage_between_query_images(mode):
    model = learner(batch_norm=mode).eval()
    batch = episodes(tasks=1, queries=3)
    support = (batch.support_x[0], batch.support_y[0])
    query = batch.query_x[0]
    other_query = torch.cat([query[:1], torch.rand_like(query[1:])])
    first = query_logits_after_adapting(model, support, query)[0]
    changed = query_logits_after_adapting(model, support, other_query)[0]
    if mode == "transductive":  # image 0's prediction depends on the other query images
        assert not torch.allclose(first, changed)
    else:  # non-transductive: image 0 alone decides
        torch.testing.assert_close(first, changed, rtol=1e-12, atol=1e-12)
        one_at_a_time = query_logits_after_adapting(model, support, query[:1])[0]
        torch.testing.assert_close(first, one_at_a_time, rtol=1e-12, atol=1e-12)


def test_running_statistics_are_collected_per_step_and_used_in_eval_mode():
    model, batch = learner(batch_norm="per_step_running"), episodes()
    norm = model.per_step_norms[0]
    assert norm.running_mean.shape == (3, 4)  # inner_steps + 1 slots
    _, metrics, _ = model.meta_loss(batch, 0)
    norm.update_running_statistics(metrics.statistics)
    assert (norm.running_mean != 0).all()  # every slot got statistics
    assert not torch.allclose(norm.running_mean[0], norm.running_mean[2])
    train_mode = model.train().meta_loss(batch, 0)[0]
    eval_mode = model.eval().meta_loss(batch, 0)[0]
    assert train_mode.item() != pytest.approx(eval_mode.item())


def test_first_order_mamlpp_trains_in_a_trainer(fake_omniglot, tmp_path):
    from fewshot.data.datamodule import FewShotDataModule

    root, cache = fake_omniglot
    data = FewShotDataModule(root=str(root), cache_dir=str(cache), ways=3, queries=2,
                             meta_batch_size=2, eval_queries=2, val_episodes=2, test_episodes=2,
                             steps_per_epoch=2, image_size=28)
    torch.manual_seed(0)
    model = MetaLearner(Conv4(1, 4, 28), ways=3, inner_steps=2, first_order=True, **ALL_ON)
    before = model.inner_lrs["head-weight"].detach().clone()
    trainer = Trainer(max_steps=6, default_root_dir=tmp_path, logger=False, inference_mode=False,
                      enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data)
    assert not torch.equal(model.inner_lrs["head-weight"], before)
    assert model.per_step_norms[0].running_mean.abs().sum() > 0
    assert trainer.optimizers[0].param_groups[0]["lr"] < 1e-3  # cosine annealed


def test_per_step_running_adapts_on_support_batch_statistics_in_eval_mode():
    # Eval mode changes only how predictions are normalised; the inner loop adapts as trained.
    model, batch = learner(batch_norm="per_step_running"), episodes()
    _, metrics, _ = model.meta_loss(batch, 0)
    model.per_step_norms[0].update_running_statistics(metrics.statistics)
    support = (batch.support_x[0], batch.support_y[0])
    in_train = model.train().adapt(*support)
    in_eval = model.eval().adapt(*support)
    for name in in_train:
        torch.testing.assert_close(in_eval[name], in_train[name], rtol=1e-12, atol=1e-12)
    query = batch.query_x[0]
    assert not torch.allclose(model.eval().predict_logits(in_eval, query),
                              model.train().predict_logits(in_train, query))


def test_evaluating_with_more_steps_than_trained_reuses_the_last_trained_slot():
    model = learner(batch_norm="per_step_running", per_step_bn_weights=True, eval_inner_steps=4)
    norm = model.per_step_norms[0]
    assert norm.slots == 3  # inner_steps + 1: no slot that training never fills
    batch = episodes()
    _, metrics, _ = model.meta_loss(batch, 0)
    norm.update_running_statistics(metrics.statistics)
    eval_metrics = model.eval()._metrics(batch, training=False)
    assert eval_metrics.accuracies.shape == (2, 5)
    with inner_step(4):
        assert norm.slot() == 2
