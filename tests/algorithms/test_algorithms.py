"""The MAML family as algorithms: Meta-SGD, ANIL, learned rates and inner optimizers, their
argument checks, and their settings; float64 equalities against plain MAML."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from episodes_for_tests import at_least_two_threads, meta_gradient, random_episodes, tiny_model

from fewshot.algorithms import (
    ALGORITHMS,
    ANIL,
    MAML,
    Algorithm,
    MAMLPlusPlus,
    MetaSGD,
    ProtoNet,
    Reptile,
    build_algorithm,
)
from fewshot.core.inner_optimizers import SGD, Adam, Momentum
from fewshot.execution import Loop, Threads, Vmap
from fewshot.inference.export import ModelFiles, build_model, make_metadata
from fewshot.inference.images import Preprocessing
from fewshot.models import Conv4, FewShotClassifier, backbone_settings

LR = 0.25  # exact in float32, so learned rates (created in float32) start at exactly this value


def built(algorithm: Algorithm, inner_optimizer=None, seed: int = 0):
    """``(network, algorithm)``: a float64 tiny network and the algorithm built on it."""
    network = tiny_model(seed=seed)
    algorithm.build(network, inner_optimizer)
    return network, algorithm.double()


def episodes(tasks: int = 2):
    return random_episodes(tasks=tasks, shots=1, queries=2)


def network_part(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: g for n, g in grads.items() if n.startswith("network.")}


def test_meta_sgd_learns_a_rate_per_entry_and_step_and_starts_as_maml():
    network, meta_sgd = built(MetaSGD(inner_steps=2, inner_lr=LR))
    for name, p in network.named_parameters():
        rates = meta_sgd.inner_lrs[name.replace(".", "-")]
        assert rates.shape == (2, *p.shape) and torch.all(rates == LR)
    assert set(meta_sgd.meta_parameters()) == {n for n, _ in network.named_parameters()}
    batch = episodes()
    loss, _, grads = meta_gradient(meta_sgd, network, batch)
    maml_network, maml = built(MAML(inner_steps=2, inner_lr=LR))
    reference_loss, _, reference = meta_gradient(maml, maml_network, batch)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-10, atol=0)
    for name, expected in network_part(reference).items():
        torch.testing.assert_close(grads[name], expected, rtol=1e-8, atol=1e-12)
    for name, rates in meta_sgd.meta_parameters().items():  # every entry's rate is meta-learned
        assert grads[f"algorithm.{name}"].shape == rates.shape
    assert grads["algorithm.head.weight"].abs().min() > 0


def test_meta_sgd_step_is_the_elementwise_product_of_rates_and_gradient():
    network, meta_sgd = built(MetaSGD(inner_steps=1, inner_lr=LR))
    with torch.no_grad():
        for rates in meta_sgd.inner_lrs.values():
            rates.uniform_(0.0, 0.5)
    batch = episodes(tasks=1)
    params = dict(network.named_parameters())
    sx, sy = batch.support_x[0], batch.support_y[0]
    adapted = meta_sgd.adapt(network, params, sx, sy)
    assert adapted.steps_taken == 1
    grads = torch.autograd.grad(F.cross_entropy(network(sx), sy), list(params.values()))
    for (name, p), g in zip(params.items(), grads, strict=True):
        expected = p - meta_sgd.inner_lrs[name.replace(".", "-")][0] * g
        torch.testing.assert_close(adapted.params[name], expected.detach(), rtol=1e-10, atol=1e-12)


def test_learned_rates_per_tensor_are_lslr_and_the_arguments_are_checked():
    network, lslr = built(MetaSGD(inner_steps=3, inner_lr=LR, learned_rates="per_tensor"))
    assert all(r.shape == (3,) for r in lslr.inner_lrs.values())
    assert len(lslr.inner_lrs) == len(list(network.parameters()))
    assert MAML().inner_lrs.keys() == set() and MAML().meta_parameters() == {}
    for bad, message in (
        (dict(learned_rates="per_layer"), "learned_rates"),
        (dict(learned_rates="per_entry", eval_inner_lr=0.1), "eval_inner_lr"),
        (dict(learned_rates="per_tensor", eval_inner_lr=0.1), "eval_inner_lr"),
        (dict(inner_steps=-1), "inner_steps"),
        (dict(inner_steps=True), "inner_steps"),
        (dict(inner_steps=1.5), "inner_steps"),
        (dict(eval_inner_steps=-2), "eval_inner_steps"),
        (dict(inner_lr=-0.1), "inner_lr"),
        (dict(inner_lr=float("nan")), "inner_lr"),
        (dict(eval_inner_lr=-0.1), "eval_inner_lr"),
        (dict(inner_max_grad_norm=0.0), "inner_max_grad_norm"),
    ):
        with pytest.raises(ValueError, match=message):
            MAML(**bad)
    with pytest.raises(ValueError, match="learned_rates"):
        ANIL(learned_rates="everything")
    with pytest.raises(ValueError, match="learned_rates"):
        MetaSGD(learned_rates="per_neuron")


def test_evaluation_uses_eval_steps_and_lr_and_learned_rates_when_learned():
    network, maml = built(MAML(inner_steps=1, inner_lr=LR, eval_inner_steps=3, eval_inner_lr=0.1))
    assert maml.evaluation_steps == 3 and MAML(inner_steps=2).evaluation_steps == 2
    batch = episodes(tasks=1)
    params = dict(network.named_parameters())
    sx, sy = batch.support_x[0], batch.support_y[0]
    by_hand = {n: p.detach() for n, p in params.items()}
    for _ in range(3):
        leaves = [p.clone().requires_grad_() for p in by_hand.values()]
        loss = F.cross_entropy(torch.func.functional_call(network, dict(zip(by_hand, leaves, strict=True)), (sx,)), sy)
        by_hand = {n: p - 0.1 * g for (n, p), g in
                   zip(by_hand.items(), torch.autograd.grad(loss, leaves), strict=True)}
    adapted = maml.adapt(network, params, sx, sy)
    for name, p in by_hand.items():
        torch.testing.assert_close(adapted.params[name], p, rtol=1e-12, atol=1e-15)
    # adapt(steps, lr) overrides both.
    once = maml.adapt(network, params, sx, sy, steps=1, lr=LR)
    assert once.steps_taken == 1
    grads = torch.autograd.grad(F.cross_entropy(network(sx), sy), list(params.values()))
    for (name, p), g in zip(params.items(), grads, strict=True):
        torch.testing.assert_close(once.params[name], (p - LR * g).detach(), rtol=1e-12, atol=1e-15)


def test_anil_leaves_the_body_untouched_in_the_inner_loop():
    network, anil = built(ANIL(inner_steps=3, inner_lr=LR))
    batch = episodes(tasks=1)
    params = dict(network.named_parameters())
    adapted = anil.adapt(network, params, batch.support_x[0], batch.support_y[0])
    head = network.head_parameter_names()
    assert head == {"head.weight", "head.bias"}
    assert anil.adapted_parameters(network) == head
    for name, p in params.items():
        assert torch.equal(adapted.params[name], p.detach()) != (name in head), name


def test_anil_needs_a_network_with_a_named_head():
    with pytest.raises(ValueError, match="head_parameter_names"):
        ANIL().build(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_anil_equals_maml_with_zero_body_rates_and_still_meta_learns_the_body():
    """ANIL is Meta-SGD whose body rates are frozen at 0: same loss, same meta-gradients."""
    network, anil = built(ANIL(inner_steps=2, inner_lr=LR))
    sgd_network, meta_sgd = built(MetaSGD(inner_steps=2, inner_lr=LR))
    with torch.no_grad():
        for name, rates in meta_sgd.inner_lrs.items():
            rates.fill_(LR if name.startswith("head-") else 0.0)
    batch = episodes()
    loss_anil, _, grads_anil = meta_gradient(anil, network, batch)
    loss_sgd, _, grads_sgd = meta_gradient(meta_sgd, sgd_network, batch)
    torch.testing.assert_close(loss_anil, loss_sgd, rtol=1e-12, atol=0)
    for name, grad in network_part(grads_anil).items():
        torch.testing.assert_close(grad, grads_sgd[name], rtol=1e-8, atol=1e-12)
    assert grads_anil["network.features.blocks.0.weight"].abs().sum() > 0  # body meta-learned


def test_anil_with_learned_rates_learns_them_for_the_head_only():
    network, anil = built(ANIL(inner_steps=2, inner_lr=LR, learned_rates="per_entry"))
    assert set(anil.inner_lrs) == {"head-weight", "head-bias"}
    assert anil.inner_lrs["head-weight"].shape == (2, *network.head.weight.shape)
    _, _, grads = meta_gradient(anil, network, episodes())
    assert all(grads[f"algorithm.{n}"].abs().sum() > 0 for n in anil.meta_parameters())


def test_zero_head_starts_every_task_from_a_zero_head_weight_and_ignores_the_stored_one():
    network, algorithm = built(MAML(inner_steps=1, inner_lr=LR, eval_inner_steps=2, zero_head=True))
    batch = episodes()
    params = dict(network.named_parameters())
    unadapted = algorithm.adapt(network, params, batch.support_x[0], batch.support_y[0], steps=0)
    assert torch.equal(unadapted.params["head.weight"], torch.zeros_like(network.head.weight))
    loss, _, grads = meta_gradient(algorithm, network, batch)
    with torch.no_grad():
        network.head.weight.normal_()  # the stored head weight plays no part
    loss_again, _, grads_again = meta_gradient(algorithm, network, batch)
    assert torch.equal(loss, loss_again)
    assert all(torch.equal(grads[n], grads_again[n]) for n in grads)
    assert torch.equal(grads["network.head.weight"], torch.zeros_like(network.head.weight))
    assert grads["network.features.blocks.0.weight"].abs().sum() > 0  # the body is meta-learned


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("inner_optimizer", [None, Adam()], ids=["sgd", "adam"])
def test_zero_head_equals_maml_from_a_zero_head_and_its_first_step_skips_only_zeros(steps, inner_optimizer):
    """The shortcut (the first step differentiates the head only) changes nothing: loss and
    meta-gradients equal plain MAML started from a zeroed head weight, in float64."""
    rate = LR if inner_optimizer is None else 0.01
    network, zeroed = built(MAML(inner_steps=steps, inner_lr=rate, zero_head=True), inner_optimizer)
    assert zeroed.inner_loop().first_step_adapts == {"head.weight", "head.bias"}
    plain_network, plain = built(MAML(inner_steps=steps, inner_lr=rate), inner_optimizer)
    with torch.no_grad():
        plain_network.head.weight.zero_()
    batch = episodes()
    loss, results, grads = meta_gradient(zeroed, network, batch)
    plain_loss, plain_results, plain_grads = meta_gradient(plain, plain_network, batch)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-12, atol=0)
    for name, grad in plain_grads.items():
        if name != "network.head.weight":
            torch.testing.assert_close(grads[name], grad, rtol=1e-9, atol=1e-13, msg=name)
    # The first update's inner gradient is the head's alone, and its norm says so.
    torch.testing.assert_close(results.diagnostics["inner_grad_norm/step_0"],
                               plain_results.diagnostics["inner_grad_norm/step_0"])


def test_zero_head_with_one_step_adapts_the_head_only():
    network, algorithm = built(MAML(inner_steps=1, inner_lr=LR, eval_inner_steps=1, zero_head=True))
    batch = episodes(tasks=1)
    params = dict(network.named_parameters())
    adapted = algorithm.adapt(network, params, batch.support_x[0], batch.support_y[0])
    # (The bias moves by the support's mean of softmax minus one-hot: zero for balanced classes.)
    for name, p in params.items():
        assert torch.equal(adapted.params[name], p.detach()) == (name != "head.weight"), name


def test_zero_head_needs_a_linear_head():
    with pytest.raises(ValueError, match="zero_head.*head.weight"):
        MAML(zero_head=True).build(torch.nn.Sequential(torch.nn.Linear(2, 2)))


CONFIGURATIONS = {
    "meta_sgd": lambda fo: (MetaSGD(2, LR, first_order=fo), None),
    "anil": lambda fo: (ANIL(2, LR, first_order=fo), None),
    "anil_meta_sgd": lambda fo: (ANIL(2, LR, first_order=fo, learned_rates="per_entry"), None),
    "lslr_adam": lambda fo: (MAML(2, 0.01, first_order=fo, learned_rates="per_tensor"), Adam()),
    "momentum_clipped": lambda fo: (MAML(2, LR, first_order=fo, inner_max_grad_norm=1.0),
                                    Momentum(0.9)),
    "zero_head": lambda fo: (MAML(2, LR, first_order=fo, zero_head=True), None),
}


@pytest.mark.parametrize("configuration", list(CONFIGURATIONS))
@pytest.mark.parametrize("first_order", [False, True])
def test_vmap_threads_and_loop_agree_for_every_algorithm(configuration, first_order):
    batch = episodes(tasks=3)
    results = []
    with at_least_two_threads():
        for executor in (Loop(), Vmap(), Threads()):
            algorithm, optimizer = CONFIGURATIONS[configuration](first_order)
            network, algorithm = built(algorithm, optimizer)
            results.append(meta_gradient(algorithm, network, batch, executor))
    (loss, _, reference), *others = results
    assert any(name.startswith("algorithm.") for name in reference) == (
        configuration in ("meta_sgd", "anil_meta_sgd", "lslr_adam"))
    for other_loss, _, grads in others:
        torch.testing.assert_close(other_loss, loss, rtol=1e-12, atol=0)
        assert grads.keys() == reference.keys()
        for name, grad in reference.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-8, atol=1e-12, msg=name)


def test_learned_rates_get_meta_gradients_with_inner_adam():
    network, algorithm = built(MAML(2, 0.01, learned_rates="per_tensor"), Adam())
    _, _, grads = meta_gradient(algorithm, network, episodes())
    assert all(torch.isfinite(grads[f"algorithm.{n}"]).all() for n in algorithm.meta_parameters())
    assert grads["algorithm.head.weight"].abs().sum() > 0


def test_build_installs_the_inner_optimizer_and_clipping():
    network, algorithm = built(MAML(inner_max_grad_norm=2.0), Adam(0.5, 0.9, 1e-4))
    assert algorithm.inner_loop().optimizer == Adam(0.5, 0.9, 1e-4, True)
    assert algorithm.inner_loop().max_grad_norm == 2.0
    assert algorithm.inner_loop().adapted is None  # MAML adapts everything
    _, default = built(MAML())
    assert default.inner_optimizer == SGD()
    _, momentum = built(MAML(), Momentum(0.5))
    assert momentum.inner_loop().optimizer == Momentum(0.5)


@pytest.mark.parametrize("algorithm", [
    MAML(2, 0.3, 3, 0.2, True, "none", 1.5), MAML(1, zero_head=True),
    ANIL(1, 0.4, learned_rates="per_entry"),
    MetaSGD(3, 0.1, 5, True, "per_tensor"), Reptile(4, 0.2, 8, 0.1), ProtoNet(),
    MAMLPlusPlus(3, 0.1, multi_step_loss_epochs=4, first_order_epochs=7, batch_norm="transductive"),
], ids=lambda a: type(a).__name__)
def test_settings_rebuild_the_same_algorithm(algorithm):
    settings = algorithm.settings()
    assert settings["class_path"] in ALGORITHMS
    rebuilt = build_algorithm(settings)
    assert type(rebuilt) is type(algorithm) and rebuilt.settings() == settings
    assert algorithm.describe()["algorithm"] == type(algorithm).__name__


def test_build_algorithm_refuses_unknown_classes_and_arguments():
    with pytest.raises(ValueError, match="os.system"):
        build_algorithm({"class_path": "os.system", "init_args": {}})
    with pytest.raises(ValueError, match="cannot build algorithm"):
        build_algorithm({"class_path": "fewshot.algorithms.maml.MAML", "init_args": {"steps": 1}})


def test_a_meta_sgd_model_adapts_to_another_number_of_ways():
    """A reset head gets, per step and feature, the trained classes' mean learned rate."""
    torch.manual_seed(0)
    backbone = Conv4(1, 4, 28)
    network = FewShotClassifier(backbone, ways=3)
    trained = ANIL(inner_steps=2, learned_rates="per_entry")
    trained.build(network)
    with torch.no_grad():
        trained.inner_lrs["head-weight"].uniform_(0.1, 0.5)
    metadata = make_metadata(backbone_settings(backbone), 3, trained.settings(), SGD().settings(),
                             Preprocessing(image_size=28, channels=1), {})
    state = {**{f"network.{k}": v for k, v in network.state_dict().items()},
             **{f"algorithm.{k}": v for k, v in trained.state_dict().items()}}
    five_way = build_model(ModelFiles(metadata, state, source="memory"), ways=5, reset_head=True)
    rates = five_way.algorithm.inner_lrs["head-weight"]
    assert rates.shape == (2, 5, 4 * 1 * 1)
    expected = trained.inner_lrs["head-weight"].mean(dim=1, keepdim=True).expand(2, 5, 4)
    torch.testing.assert_close(rates, expected)
    assert torch.equal(five_way.network.head.weight, torch.zeros(5, 4))
    support = torch.rand(10, 1, 28, 28)
    adapted = five_way.adapt(support, torch.arange(5).repeat(2))
    assert five_way.predict_logits(adapted, torch.rand(4, 1, 28, 28)).shape == (4, 5)
