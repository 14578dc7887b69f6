"""MAML++: every switch changes behaviour, and only its own; all off is plain MAML."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from episodes_for_tests import meta_gradient, random_episodes
from lightning.pytorch import Trainer

from fewshot.algorithms import MAML, MAMLPlusPlus
from fewshot.algorithms.mamlpp import (
    multi_step_loss_weights,
    use_first_order,
    use_per_step_batch_norm,
)
from fewshot.core.step_context import inner_step
from fewshot.execution import Loop, Vmap, run_meta_batch
from fewshot.models import Conv4, FewShotClassifier, TransductiveBatchNorm2d
from fewshot.models.per_step_batch_norm import PerStepBatchNorm2d
from fewshot.training.module import MetaLearner
from fewshot.training.schedules import CosineAnnealing

ALL_OFF = dict(learned_rates="none", multi_step_loss=False, derivative_order_annealing=False,
               per_step_bn_weights=False, batch_norm="transductive")
ALL_ON = dict(learned_rates="per_tensor", multi_step_loss=True, multi_step_loss_epochs=3,
              derivative_order_annealing=True, first_order_epochs=2, per_step_bn_weights=True,
              batch_norm="per_step_running")
LR = 0.25  # exact in float32 (LSLR rates are created in float32)


def mamlpp(**switches) -> MAMLPlusPlus:
    """MAML++ with 2 inner steps of 0.25 and every switch off unless given."""
    return MAMLPlusPlus(**{"inner_steps": 2, "inner_lr": LR, **ALL_OFF, **switches})


def built(algorithm, seed: int = 0):
    """``(network, algorithm)``: a 3-way Conv4 (4 filters, 16x16) with the algorithm built on
    it, then both in float64 (model surgery first, so the new layers are converted too)."""
    torch.manual_seed(seed)
    network = FewShotClassifier(Conv4(1, 4, 16), ways=3)
    algorithm.build(network)
    return network.double(), algorithm.double()


def episodes(tasks: int = 2, queries: int = 2):
    return random_episodes(tasks=tasks, shots=1, queries=queries)


def network_grads(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: g for n, g in grads.items() if n.startswith("network.")}


def plain_maml(batch, first_order: bool = False, adapt_batch_norm: bool = True):
    """The loss and network meta-gradient of MAML (2 steps of 0.25), the loop, float64.
    Without ``adapt_batch_norm`` the batch-norm affine parameters get inner rate 0 (per-tensor
    rates, fixed)."""
    if adapt_batch_norm:
        network, maml = built(MAML(2, LR, first_order=first_order))
    else:
        network, maml = built(MAML(2, LR, first_order=first_order, learned_rates="per_tensor"))
        with torch.no_grad():
            for name, rates in maml.inner_lrs.items():
                layer = network.get_submodule(name.replace("-", ".").rpartition(".")[0])
                rates.fill_(0.0 if isinstance(layer, TransductiveBatchNorm2d) else LR)
    loss, _, grads = meta_gradient(maml, network, batch)
    return loss, network_grads(grads)


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
    with pytest.raises(ValueError, match="inner_steps >= 1"):
        multi_step_loss_weights(0, 0, epochs)


def test_derivative_order_annealing_switches_at_the_configured_epoch():
    assert [use_first_order(e, False, True, 3) for e in range(5)] == [True] * 3 + [False] * 2
    assert not any(use_first_order(e, False, False, 3) for e in range(5))
    assert all(use_first_order(e, True, False, 3) for e in range(5))
    algorithm = mamlpp(derivative_order_annealing=True, first_order_epochs=3)
    assert [algorithm.first_order_at(e) for e in range(5)] == [True] * 3 + [False] * 2
    assert all(mamlpp(first_order=True).first_order_at(e) for e in range(5))
    assert not any(mamlpp().first_order_at(e) for e in range(5))


def test_defaults_are_all_on_and_the_arguments_are_checked():
    defaults = MAMLPlusPlus()
    assert (defaults.inner_steps, defaults.learned_rates, defaults.multi_step_loss,
            defaults.derivative_order_annealing, defaults.per_step_bn_weights,
            defaults.batch_norm) == (5, "per_tensor", True, True, True, "per_step_running")
    for bad, message in ((dict(inner_steps=0, multi_step_loss=True), "multi_step_loss"),
                         (dict(batch_norm="running"), "batch_norm"),
                         (dict(multi_step_loss_epochs=-1), "multi_step_loss_epochs"),
                         (dict(first_order_epochs=-1), "first_order_epochs"),
                         (dict(learned_rates="per_tensor", eval_inner_lr=0.1), "eval_inner_lr")):
        with pytest.raises(ValueError, match=message):
            MAMLPlusPlus(**bad)
    no_batch_norm = FewShotClassifier(Conv4(1, 4, 16, norm_layer=torch.nn.Identity), 3)
    with pytest.raises(ValueError, match="no TransductiveBatchNorm2d"):
        MAMLPlusPlus().build(no_batch_norm)


def test_cosine_annealing_schedule_values(tmp_path):
    torch.manual_seed(0)
    model = MetaLearner(Conv4(1, 4, 16), 3, algorithm=mamlpp(),
                        optimizer=partial(torch.optim.Adam, lr=1e-3),
                        lr_scheduler=partial(CosineAnnealing, eta_min=1e-5))
    model.trainer = Trainer(max_steps=10, default_root_dir=tmp_path, logger=False)
    config = model.configure_optimizers()
    optimizer, schedule = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    for step in range(11):
        expected = 1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * step / 10)) / 2
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)
        optimizer.step()
        schedule.step()


def test_cosine_annealing_needs_a_run_length(tmp_path):
    model = MetaLearner(Conv4(1, 4, 16), 3, algorithm=mamlpp(), lr_scheduler=CosineAnnealing)
    model.trainer = Trainer(max_time="00:00:01:00", default_root_dir=tmp_path, logger=False)
    with pytest.raises(ValueError, match="max_steps"):
        model.configure_optimizers()


# -- equivalences --------------------------------------------------------------------------

def test_all_switches_off_is_plain_maml():
    network, algorithm = built(mamlpp())
    assert not any(isinstance(m, PerStepBatchNorm2d) for m in network.modules())  # no surgery
    assert algorithm.meta_parameters() == {}
    batch = episodes()
    loss, _, grads = meta_gradient(algorithm, network, batch)
    ref_loss, ref_grads = plain_maml(batch)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-12)


def test_lslr_starts_as_plain_maml():
    # The rates start at inner_lr: before any training LSLR computes plain MAML.
    network, algorithm = built(mamlpp(learned_rates="per_tensor"))
    batch = episodes()
    loss, _, grads = meta_gradient(algorithm, network, batch)
    ref_loss, ref_grads = plain_maml(batch)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-12)
    for name, expected in ref_grads.items():
        torch.testing.assert_close(grads[name], expected, rtol=1e-10, atol=1e-12)


def test_bnwb_starts_as_maml_with_batch_norm_meta_learned_only():
    # Every slot starts from the shared affine values, and slot k serves only the forward
    # passes after k updates, so the inner loop's update of slot k is never used: per-step
    # weights are meta-learned, not adapted (as in MAML++).
    network, algorithm = built(mamlpp(per_step_bn_weights=True))
    norms = [m for m in network.modules() if isinstance(m, PerStepBatchNorm2d)]
    assert len(norms) == 4 and all(m.weight.shape == (3, 4) for m in norms)
    batch = episodes()
    loss, _, grads = meta_gradient(algorithm, network, batch)
    frozen, _ = plain_maml(batch, adapt_batch_norm=False)
    adapted, _ = plain_maml(batch)
    assert loss.item() == pytest.approx(frozen.item(), rel=1e-12)
    assert loss.item() != pytest.approx(adapted.item(), rel=1e-6)
    # Slot k of the per-step affine parameters gets its own meta-gradient.
    weight_grad = grads["network.features.blocks.1.weight"]
    assert all(weight_grad[slot].abs().sum() > 0 for slot in range(3))


def test_msl_changes_only_the_loss_weighting():
    batch = episodes()
    network, algorithm = built(mamlpp(multi_step_loss=True, multi_step_loss_epochs=4))
    results = run_meta_batch(algorithm, network, batch, Loop(), training=True, epoch=0)
    assert results.objective.shape == results.losses.shape == (2, 3)  # before and after 2 steps
    uniform = algorithm.meta_loss(results, epoch=0)
    assert uniform.item() == pytest.approx(results.losses[:, 1:].mean().item(), rel=1e-12)
    weights = multi_step_loss_weights(2, 2, 4)
    assert weights[0] < weights[1]
    weighted = algorithm.meta_loss(results, epoch=2)
    expected = (results.losses[:, 1:] * weights.double()).sum(dim=1).mean()
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-12)
    assert weighted.requires_grad
    # From multi_step_loss_epochs on, training scores the last step only: plain MAML.
    assert not algorithm.every_step_at(4) and algorithm.every_step_at(3)
    after, _, _ = meta_gradient(algorithm, network, batch, epoch=4)
    assert after.item() == pytest.approx(plain_maml(batch)[0].item(), rel=1e-12)


def test_da_is_first_order_before_the_epoch_and_second_order_after():
    batch = episodes()
    network, algorithm = built(mamlpp(derivative_order_annealing=True, first_order_epochs=2))
    _, _, early = meta_gradient(algorithm, network, batch, epoch=1)
    _, _, late = meta_gradient(algorithm, network, batch, epoch=2)
    _, first = plain_maml(batch, first_order=True)
    _, second = plain_maml(batch)
    assert relative_difference(first, second) > 1e-3
    for name in first:
        torch.testing.assert_close(early[name], first[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(late[name], second[name], rtol=1e-10, atol=1e-12)


def relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    flat_a = torch.cat([a[n].flatten() for n in a])
    flat_b = torch.cat([b[n].flatten() for n in a])
    return ((flat_a - flat_b).norm() / flat_b.norm()).item()


def test_lslr_rates_get_meta_gradients_and_are_used_per_step_and_layer():
    network, algorithm = built(mamlpp(learned_rates="per_tensor"))
    batch = episodes()
    results = run_meta_batch(algorithm, network, batch, Loop(), training=True)
    algorithm.meta_loss(results, epoch=0).backward()
    assert len(algorithm.inner_lrs) == len(list(network.parameters()))
    assert all(r.shape == (2,) and r.grad is not None and r.grad.abs().sum() > 0
               for r in algorithm.inner_lrs.values())
    # Per step and layer: zero the head's rate at step 1 only; the head then moves at step 0
    # and stays put at step 1, while the other layers move at both steps.
    with torch.no_grad():
        algorithm.inner_lrs["head-weight"][1] = 0.0
    params = dict(network.named_parameters())
    sx, sy = batch.support_x[0], batch.support_y[0]
    one = algorithm.adapt(network, params, sx, sy, steps=1).params
    two = algorithm.adapt(network, params, sx, sy, steps=2).params
    assert not torch.equal(one["head.weight"], params["head.weight"].detach())
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


def test_per_step_surgery_keeps_the_function_of_the_network():
    torch.manual_seed(0)
    network = FewShotClassifier(Conv4(1, 4, 16), ways=3).double()
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, TransductiveBatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    x = random_episodes(tasks=1).support_x[0]
    before = network(x)
    replaced = use_per_step_batch_norm(network, 3, True, "transductive")
    network.double()
    assert len(replaced) == 4 and [layer.key for layer in replaced][0] == "features.blocks.1"
    for step in range(3):
        with inner_step(step):
            torch.testing.assert_close(network(x), before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_and_loop_agree_with_every_switch_on(first_order):
    batch = episodes(tasks=3)
    results = {}
    for executor in (Vmap(), Loop()):
        network, algorithm = built(MAMLPlusPlus(inner_steps=2, inner_lr=LR, first_order=first_order,
                                                **ALL_ON))
        # MSL on; second order unless first_order (epoch 2 is past first_order_epochs).
        assert algorithm.first_order_at(2) == first_order and algorithm.every_step_at(2)
        results[type(executor).__name__] = meta_gradient(algorithm, network, batch, executor, epoch=2)
    (l1, r1, g1), (l2, r2, g2) = results["Vmap"], results["Loop"]
    assert l1.item() == pytest.approx(l2.item(), rel=1e-12)
    assert g1.keys() == g2.keys() and any(k.startswith("algorithm.") for k in g1)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-9, atol=1e-12, msg=name)
    s1, s2 = r1.batch_norm_statistics, r2.batch_norm_statistics
    assert s1.keys() == s2.keys() and any(k.endswith("/mean") for k in s1)
    for key in s1:
        torch.testing.assert_close(s1[key], s2[key], rtol=1e-10, atol=1e-12)


# -- batch-norm modes ----------------------------------------------------------------------

def query_logits_after_adapting(network, algorithm, support, query) -> torch.Tensor:
    adapted = algorithm.adapt(network, dict(network.named_parameters()), *support)
    return algorithm.predict(network, adapted, query)


@pytest.mark.parametrize("mode", ["transductive", "per_step_running"])
def test_leakage_between_query_images(mode):
    network, algorithm = built(mamlpp(batch_norm=mode))
    network.eval()
    batch = episodes(tasks=1, queries=3)
    support = (batch.support_x[0], batch.support_y[0])
    query = batch.query_x[0]
    other_query = torch.cat([query[:1], torch.rand_like(query[1:])])
    first = query_logits_after_adapting(network, algorithm, support, query)[0]
    changed = query_logits_after_adapting(network, algorithm, support, other_query)[0]
    if mode == "transductive":  # image 0's prediction depends on the other query images
        assert not torch.allclose(first, changed)
    else:  # non-transductive: image 0 alone decides
        torch.testing.assert_close(first, changed, rtol=1e-12, atol=1e-12)
        one_at_a_time = query_logits_after_adapting(network, algorithm, support, query[:1])[0]
        torch.testing.assert_close(first, one_at_a_time, rtol=1e-12, atol=1e-12)


def fold_in(network, results) -> PerStepBatchNorm2d:
    """Update every per-step layer's running statistics with the task means (as the training
    module does after each step); returns the first layer."""
    means = {k: v.mean(dim=0) for k, v in results.batch_norm_statistics.items()}
    layers = [m for m in network.modules() if isinstance(m, PerStepBatchNorm2d)]
    for layer in layers:
        layer.update_running_statistics(means)
    return layers[0]


def test_running_statistics_are_collected_per_step_and_used_in_eval_mode():
    network, algorithm = built(mamlpp(batch_norm="per_step_running"))
    batch = episodes()
    results = run_meta_batch(algorithm, network, batch, Loop(), training=True)
    # Support passes at steps 0 and 1, the query pass after step 2: every slot, every layer.
    layers = [f"features.blocks.{i}" for i in (1, 5, 9, 13)]
    assert set(results.batch_norm_statistics) == {
        f"{layer}/{slot}/{kind}" for layer in layers for slot in range(3) for kind in ("mean", "var")}
    assert all(v.shape == (2, 4) and not v.requires_grad
               for v in results.batch_norm_statistics.values())
    norm = fold_in(network, results)
    assert norm.running_mean.shape == (3, 4)  # inner_steps + 1 slots
    assert (norm.running_mean != 0).all()  # every slot got statistics
    assert not torch.allclose(norm.running_mean[0], norm.running_mean[2])
    expected = 0.1 * results.batch_norm_statistics["features.blocks.1/0/mean"].mean(dim=0)
    torch.testing.assert_close(norm.running_mean[0], expected)
    train_mode = algorithm.meta_loss(run_meta_batch(algorithm, network.train(), batch, Loop()), 0)
    eval_mode = algorithm.meta_loss(run_meta_batch(algorithm, network.eval(), batch, Loop()), 0)
    assert train_mode.item() != pytest.approx(eval_mode.item())


def test_first_order_mamlpp_trains_in_a_trainer(fake_omniglot, tmp_path):
    from fewshot.training.datamodule import FewShotDataModule

    root, cache = fake_omniglot
    data = FewShotDataModule(root=str(root), cache_dir=str(cache), ways=3, queries=2,
                             meta_batch_size=2, eval_queries=2, val_episodes=2, test_episodes=2,
                             steps_per_epoch=2, image_size=28)
    torch.manual_seed(0)
    algorithm = MAMLPlusPlus(inner_steps=2, inner_lr=LR, first_order=True, **ALL_ON)
    model = MetaLearner(Conv4(1, 4, 28), ways=3, algorithm=algorithm,
                        optimizer=partial(torch.optim.Adam, lr=1e-3),
                        lr_scheduler=partial(CosineAnnealing, eta_min=1e-5))
    before = model.algorithm.inner_lrs["head-weight"].detach().clone()
    trainer = Trainer(max_steps=6, default_root_dir=tmp_path, logger=False, inference_mode=False,
                      enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data)
    assert not torch.equal(model.algorithm.inner_lrs["head-weight"], before)
    norms = [m for m in model.network.modules() if isinstance(m, PerStepBatchNorm2d)]
    assert norms and norms[0].running_mean.abs().sum() > 0
    assert trainer.optimizers[0].param_groups[0]["lr"] < 1e-3  # cosine annealed


def test_per_step_running_adapts_on_support_batch_statistics_in_eval_mode():
    # Eval mode changes only how predictions are normalised; the inner loop adapts as trained.
    network, algorithm = built(mamlpp(batch_norm="per_step_running"))
    batch = episodes()
    fold_in(network, run_meta_batch(algorithm, network, batch, Loop(), training=True))
    params = dict(network.named_parameters())
    support = (batch.support_x[0], batch.support_y[0])
    in_train = algorithm.adapt(network.train(), params, *support)
    in_eval = algorithm.adapt(network.eval(), params, *support)
    for name in in_train.params:
        torch.testing.assert_close(in_eval.params[name], in_train.params[name], rtol=1e-12, atol=1e-12)
    query = batch.query_x[0]
    assert not torch.allclose(algorithm.predict(network.eval(), in_eval, query),
                              algorithm.predict(network.train(), in_train, query))


def test_evaluating_with_more_steps_than_trained_reuses_the_last_trained_slot():
    network, algorithm = built(mamlpp(batch_norm="per_step_running", per_step_bn_weights=True,
                                      eval_inner_steps=4))
    norm = next(m for m in network.modules() if isinstance(m, PerStepBatchNorm2d))
    assert norm.slots == 3  # inner_steps + 1: no slot that training never fills
    batch = episodes()
    fold_in(network, run_meta_batch(algorithm, network, batch, Loop(), training=True))
    results = run_meta_batch(algorithm, network.eval(), batch, Loop(), training=False)
    assert results.accuracies.shape == results.losses.shape == (2, 5)
    assert torch.isfinite(results.losses).all()
    with inner_step(4):
        assert norm.slot() == 2
