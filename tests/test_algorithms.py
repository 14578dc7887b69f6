"""The algorithm family on the MetaLearner: Meta-SGD, ANIL and inner optimizers."""

from __future__ import annotations

import pytest
import torch
from test_mamlpp import episodes, learner, plain_maml

from fewshot.core.episode import Episodes
from fewshot.inference.export import ModelFiles, build_meta_learner, make_metadata
from fewshot.inference.images import Preprocessing
from fewshot.core.inner_optimizers import Adam, Momentum
from fewshot.maml import adapt
from fewshot.models import Conv4
from fewshot.training.module import MetaLearner


def meta_gradients(model: MetaLearner, batch: Episodes) -> dict[str, torch.Tensor]:
    loss, _, _ = model.meta_loss(batch, epoch=0)
    names, tensors = zip(*[(n, p) for n, p in model.named_parameters()], strict=True)
    grads = torch.autograd.grad(loss, tensors, allow_unused=True)
    return dict(zip(names, grads, strict=True))


def test_meta_sgd_learns_a_rate_per_entry_and_step_and_starts_as_maml():
    model, batch = learner(meta_sgd=True), episodes()
    for name, p in model.network.named_parameters():
        rates = model.inner_lrs[name.replace(".", "-")]
        assert rates.shape == (2, *p.shape) and torch.all(rates == 0.25)
    reference_loss, reference_grads = plain_maml(model, batch)
    loss, _, _ = model.meta_loss(batch, epoch=0)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-10, atol=0)
    grads = meta_gradients(model, batch)
    for name, expected in reference_grads.items():
        torch.testing.assert_close(grads[f"network.{name}"], expected, rtol=1e-8, atol=1e-12)
    for name, rates in model.inner_lrs.items():  # every entry's rate is meta-learned
        assert grads[f"inner_lrs.{name}"].shape == rates.shape
    assert grads["inner_lrs.head-weight"].abs().min() > 0


def test_meta_sgd_step_is_the_elementwise_product_of_rates_and_gradient():
    model, batch = learner(meta_sgd=True, inner_steps=1), episodes(tasks=1)
    with torch.no_grad():
        for rates in model.inner_lrs.values():
            rates.uniform_(0.0, 0.5)
    params = dict(model.network.named_parameters())
    sx, sy = batch.support_x[0], batch.support_y[0]
    adapted = adapt(model.network, params, sx, sy, steps=1, lr=model._inner_lr(training=True))
    loss = torch.nn.functional.cross_entropy(model.network(sx), sy)
    grads = torch.autograd.grad(loss, list(params.values()))
    for (name, p), g in zip(params.items(), grads, strict=True):
        expected = p - model.inner_lrs[name.replace(".", "-")][0] * g
        torch.testing.assert_close(adapted[name], expected, rtol=1e-10, atol=1e-12)


def test_meta_sgd_and_lslr_are_exclusive():
    with pytest.raises(ValueError, match="meta_sgd and learn_inner_lr"):
        MetaLearner(Conv4(1, 4, 16), 3, meta_sgd=True, learn_inner_lr=True)


def test_anil_leaves_the_body_untouched_in_the_inner_loop():
    model, batch = learner(anil=True, inner_steps=3), episodes(tasks=1)
    params = dict(model.network.named_parameters())
    adapted = adapt(model.network, params, batch.support_x[0], batch.support_y[0], steps=3,
                    lr=0.25, inner=model.inner_loop)
    head = model.network.head_parameter_names()
    assert head == {"head.weight", "head.bias"}
    for name, p in params.items():
        assert torch.equal(adapted[name], p) != (name in head), name


def test_anil_equals_maml_with_zero_body_rates_and_still_meta_learns_the_body():
    """ANIL is Meta-SGD whose body rates are frozen at 0: same loss, same meta-gradients."""
    anil, meta_sgd, batch = learner(anil=True), learner(meta_sgd=True), episodes()
    with torch.no_grad():
        for name, rates in meta_sgd.inner_lrs.items():
            rates.fill_(0.25 if name.startswith("head-") else 0.0)
    loss_anil, _, _ = anil.meta_loss(batch, 0)
    loss_sgd, _, _ = meta_sgd.meta_loss(batch, 0)
    torch.testing.assert_close(loss_anil, loss_sgd, rtol=1e-12, atol=0)
    grads_anil, grads_sgd = meta_gradients(anil, batch), meta_gradients(meta_sgd, batch)
    for name, _ in anil.network.named_parameters():
        torch.testing.assert_close(grads_anil[f"network.{name}"], grads_sgd[f"network.{name}"],
                                   rtol=1e-8, atol=1e-12)
    assert grads_anil["network.features.blocks.0.weight"].abs().sum() > 0  # body meta-learned


def test_anil_with_learned_rates_learns_them_for_the_head_only():
    model = learner(anil=True, meta_sgd=True)
    assert set(model.inner_lrs) == {"head-weight", "head-bias"}
    grads = meta_gradients(model, episodes())
    assert all(grads[f"inner_lrs.{n}"].abs().sum() > 0 for n in model.inner_lrs)


@pytest.mark.parametrize("options", [
    dict(meta_sgd=True), dict(anil=True), dict(anil=True, meta_sgd=True),
    dict(inner_optimizer="adam", learn_inner_lr=True, inner_lr=0.01),
    dict(inner_optimizer="momentum", inner_max_grad_norm=1.0),
])
@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_threads_and_loop_agree_for_every_algorithm(options, first_order):
    results = []
    for batching in ("loop", "vmap", "threads"):
        model = learner(batching=batching, first_order=first_order, **options)
        results.append(meta_gradients(model, episodes(tasks=3)))
    for other in results[1:]:
        for name, grad in results[0].items():
            if grad is not None:
                torch.testing.assert_close(other[name], grad, rtol=1e-8, atol=1e-12)


def test_learned_rates_get_meta_gradients_with_inner_adam():
    model = learner(inner_optimizer="adam", learn_inner_lr=True, inner_lr=0.01)
    grads = meta_gradients(model, episodes())
    assert all(torch.isfinite(grads[f"inner_lrs.{n}"]).all() for n in model.inner_lrs)
    assert grads["inner_lrs.head-weight"].abs().sum() > 0


def test_module_builds_the_configured_inner_optimizer_and_names_bad_values():
    model = MetaLearner(Conv4(1, 4, 16), 3, inner_optimizer="adam", inner_betas=(0.5, 0.9),
                        inner_eps=1e-4, inner_max_grad_norm=2.0)
    assert model.inner_loop.optimizer == Adam(0.5, 0.9, 1e-4, True)
    assert model.inner_loop.max_grad_norm == 2.0
    assert MetaLearner(Conv4(1, 4, 16), 3, inner_optimizer="momentum",
                       inner_momentum=0.5).inner_loop.optimizer == Momentum(0.5)
    for bad, message in ((dict(inner_optimizer="lbfgs"), "inner_optimizer"),
                         (dict(inner_max_grad_norm=0.0), "inner_max_grad_norm"),
                         (dict(inner_optimizer="adam", inner_betas=(1.0, 0.9)), "beta1")):
        with pytest.raises(ValueError, match=message):
            MetaLearner(Conv4(1, 4, 16), 3, **bad)


def test_a_meta_sgd_model_adapts_to_another_number_of_ways():
    """A reset head gets, per step and feature, the trained classes' mean learned rate."""
    torch.manual_seed(0)
    trained = MetaLearner(Conv4(1, 4, 28), ways=3, meta_sgd=True, anil=True, inner_steps=2)
    with torch.no_grad():
        trained.inner_lrs["head-weight"].uniform_(0.1, 0.5)
    metadata = make_metadata({"class_path": "fewshot.models.Conv4",
                              "init_args": {"in_channels": 1, "hidden_channels": 4, "image_size": 28}},
                             dict(trained.hparams), Preprocessing(image_size=28, channels=1), {})
    files = ModelFiles(metadata, trained.state_dict(), source="memory")
    five_way = build_meta_learner(files, ways=5, reset_head=True)
    rates = five_way.inner_lrs["head-weight"]
    assert rates.shape == (2, 5, 4 * 1 * 1)
    expected = trained.inner_lrs["head-weight"].mean(dim=1, keepdim=True).expand(2, 5, 4)
    torch.testing.assert_close(rates, expected)
    support = torch.rand(10, 1, 28, 28)
    params = five_way.adapt(support, torch.arange(5).repeat(2))
    assert five_way.predict_logits(params, torch.rand(4, 1, 28, 28)).shape == (4, 5)
