"""Every algorithm survives export -> load: the same weights, settings and predictions."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from tiny_exports import export_model, export_weights, images, tiny_model

import fewshot
from fewshot.algorithms import ALGORITHMS, ANIL, MAML, MAMLPlusPlus, MetaSGD, ProtoNet, Reptile
from fewshot.core.inner_optimizers import SGD, Adam, Momentum

# (id, algorithm, inner optimizer, learned-rate tensors in the export)
CASES = [
    ("maml", lambda: MAML(inner_steps=2, inner_lr=0.3, eval_inner_steps=3), SGD, 0),
    ("maml-zero-head", lambda: MAML(inner_steps=1, inner_lr=0.3, eval_inner_steps=2, zero_head=True), SGD, 0),
    ("maml-adam", lambda: MAML(inner_steps=1, inner_lr=0.01), lambda: Adam(0.8, 0.99, 1e-3, False), 0),
    # All five fixes on: learned per-tensor rates, per-step batch-norm weights and statistics.
    ("mamlpp", lambda: MAMLPlusPlus(inner_steps=2, inner_lr=0.2), SGD, 18),
    ("meta-sgd", lambda: MetaSGD(inner_steps=2, inner_lr=0.2), lambda: Momentum(0.5), 18),
    ("anil-meta-sgd", lambda: ANIL(inner_steps=2, inner_lr=0.3, learned_rates="per_entry"), SGD, 2),
    ("reptile", lambda: Reptile(inner_steps=3, inner_lr=0.2, eval_inner_steps=4), SGD, 0),
    ("protonet", ProtoNet, SGD, 0),
]


@pytest.mark.parametrize(("make_algorithm", "make_optimizer", "rates"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_every_algorithm_round_trips_to_identical_predictions(make_algorithm, make_optimizer, rates, tmp_path):
    model, metadata = tiny_model(make_algorithm(), ways=3, inner_optimizer=make_optimizer())
    export = export_model(model, metadata, tmp_path / "export")
    written = json.loads((export / "fewshot.json").read_text())
    assert written["format_version"] == 2 and written["ways"] == 3
    assert written["algorithm"] == model.algorithm.settings()
    assert written["algorithm"]["class_path"] in ALGORITHMS
    assert written["inner_optimizer"] == model.algorithm.inner_optimizer.settings()
    weights = safetensors.torch.load_file(export / "model.safetensors")
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert sum(name.startswith("algorithm.inner_lrs.") for name in weights) == rates
    assert all(name.startswith(("network.", "algorithm.inner_lrs.")) for name in weights)

    learner = fewshot.load(export)
    loaded = learner._meta_learner(3, reset_head=False)
    assert type(loaded.algorithm) is type(model.algorithm)
    assert loaded.algorithm.settings() == model.algorithm.settings()
    assert type(loaded.algorithm.inner_optimizer) is type(model.algorithm.inner_optimizer)
    assert loaded.algorithm.inner_optimizer.settings() == model.algorithm.inner_optimizer.settings()
    assert learner.steps == model.algorithm.evaluation_steps

    support, labels, query = images(6), torch.tensor([0, 1, 2, 2, 1, 0]), images(5, seed=1)
    expected = model.predict_logits(model.adapt(support, labels), query)
    assert torch.equal(loaded.predict_logits(loaded.adapt(support, labels), query), expected)
    predictions = learner.adapt(support, labels.tolist()).predict(query)
    assert predictions.classes == [0, 1, 2]
    assert torch.equal(predictions.probabilities, expected.softmax(dim=1))
    # And the adaptation did something: the unadapted model predicts otherwise (ProtoNet has
    # no inner loop and no use for its head, so the test is that it ignores the head).
    if isinstance(model.algorithm, ProtoNet):
        with torch.no_grad():
            model.network.head.weight.add_(1.0)
        assert torch.equal(model.predict_logits(model.adapt(support, labels), query), expected)
    else:
        unadapted = model.predict_logits(model.adapt(support, labels, steps=0), query)
        assert not torch.allclose(unadapted, expected)


@pytest.mark.parametrize(("make_algorithm", "make_optimizer", "rates"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_loaded_model_saved_again_is_byte_for_byte_the_same_export(
        make_algorithm, make_optimizer, rates, tmp_path):
    model, metadata = tiny_model(make_algorithm(), inner_optimizer=make_optimizer())
    first = export_model(model, metadata, tmp_path / "first")
    second = fewshot.load(first).save(tmp_path / "second")
    for name in ("fewshot.json", "model.safetensors"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_learned_rates_come_back_as_the_algorithms_own_and_are_used(tmp_path):
    """Meta-SGD's per-entry rates are read into algorithm.inner_lrs and adapt with them."""
    model, metadata = tiny_model(MetaSGD(inner_steps=1, inner_lr=0.2))
    export = export_model(model, metadata, tmp_path / "export")
    loaded = fewshot.load(export)._meta_learner(3, reset_head=False)
    for name, rate in model.algorithm.inner_lrs.items():
        assert torch.equal(loaded.algorithm.inner_lrs[name], rate)
    weights = safetensors.torch.load_file(export / "model.safetensors")
    weights["algorithm.inner_lrs.head-weight"] = torch.zeros_like(weights["algorithm.inner_lrs.head-weight"])
    weights["algorithm.inner_lrs.head-bias"] = torch.zeros_like(weights["algorithm.inner_lrs.head-bias"])
    other = export_weights(weights, metadata, tmp_path / "zero-head-rates")
    support, labels, query = images(6), torch.tensor([0, 1, 2] * 2), images(4, seed=1)
    changed = fewshot.load(other)._meta_learner(3, reset_head=False)
    assert not torch.equal(changed.predict_logits(changed.adapt(support, labels), query),
                           loaded.predict_logits(loaded.adapt(support, labels), query))
    adapted = changed.adapt(support, labels)  # a zero rate leaves the head where it was
    assert torch.equal(adapted.params["head.weight"], changed.network.head.weight)


@pytest.mark.parametrize("ways", [2, 5])
def test_meta_sgd_head_rates_are_averaged_for_another_number_of_classes(ways, tmp_path):
    model, metadata = tiny_model(MetaSGD(inner_steps=1, inner_lr=0.2), ways=3)
    learner = fewshot.load(export_model(model, metadata, tmp_path / "export"))
    predictor = learner.adapt(images(2 * ways), list(range(ways)) * 2)
    assert predictor.head_reset
    rates = predictor.model.algorithm.inner_lrs
    trained = model.algorithm.inner_lrs["head-weight"]  # [steps, 3, features]
    assert rates["head-weight"].shape == (1, ways, trained.shape[-1])
    expected = trained.mean(dim=1, keepdim=True).expand(-1, ways, -1)
    assert torch.allclose(rates["head-weight"], expected)
    assert torch.equal(rates["features-blocks-0-weight"], model.algorithm.inner_lrs["features-blocks-0-weight"])
