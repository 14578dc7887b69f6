"""Format-1 exports (written by fewshot before the architecture rebuild) still load and predict
exactly as the code that wrote them did (tests/fixtures/format1, see its script)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

import fewshot
from fewshot.inference.export import FORMAT_VERSION, read_export

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "format1"
EXPECTED = safetensors.torch.load_file(FIXTURES / "expected.safetensors")


@pytest.mark.parametrize("name", ["maml", "mamlpp", "anil_meta_sgd"])
@pytest.mark.parametrize("ways", [3, 4])
def test_a_format1_export_predicts_as_the_code_that_wrote_it(name, ways):
    assert json.loads((FIXTURES / name / "fewshot.json").read_text())["format_version"] == 1
    learner = fewshot.load(FIXTURES / name)
    support = torch.cat([EXPECTED[f"{name}/support"]] * 2)[: 2 * ways]
    labels = [i % ways for i in range(2 * ways)]
    probabilities = learner.adapt(support, labels).predict(EXPECTED[f"{name}/query"]).probabilities
    torch.testing.assert_close(probabilities, EXPECTED[f"{name}/probabilities_{ways}way"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("name", "algorithm", "learned_rates", "optimizer", "rates"), [
    ("maml", "fewshot.algorithms.maml.MAML", "none", "fewshot.core.inner_optimizers.sgd.SGD", 0),
    ("mamlpp", "fewshot.algorithms.mamlpp.MAMLPlusPlus", "per_tensor",
     "fewshot.core.inner_optimizers.sgd.SGD", 18),
    ("anil_meta_sgd", "fewshot.algorithms.anil.ANIL", "per_entry",
     "fewshot.core.inner_optimizers.adam.Adam", 2),
])
def test_format1_flags_are_upgraded_to_an_algorithm_and_an_inner_optimizer(
        name, algorithm, learned_rates, optimizer, rates):
    model = read_export(FIXTURES / name)
    metadata = model.metadata
    assert metadata["format_version"] == 2 and metadata["upgraded_from_format"] == 1
    assert "hyper_parameters" not in metadata and metadata["ways"] == 3
    assert metadata["algorithm"]["class_path"] == algorithm
    assert metadata["algorithm"]["init_args"]["learned_rates"] == learned_rates
    assert metadata["inner_optimizer"]["class_path"] == optimizer
    # The old module's inner_lrs.* are the algorithm's now; nothing is left under the old name.
    assert not any(key.startswith("inner_lrs.") for key in model.state_dict)
    assert sum(key.startswith("algorithm.inner_lrs.") for key in model.state_dict) == rates


def test_the_mamlpp_fixture_keeps_its_per_step_batch_norm_and_learned_rates():
    learner = fewshot.load(FIXTURES / "mamlpp")
    assert learner.lr is None and learner.steps == 2
    assert not learner.batch_dependent  # per-step running statistics: images predicted alone
    init_args = learner.metadata["algorithm"]["init_args"]
    assert init_args["batch_norm"] == "per_step_running" and init_args["per_step_bn_weights"]
    assert init_args["multi_step_loss"] and not init_args["derivative_order_annealing"]


@pytest.mark.parametrize("name", ["maml", "mamlpp", "anil_meta_sgd"])
def test_a_format1_export_saved_again_is_format2_and_predicts_the_same(name, tmp_path):
    learner = fewshot.load(FIXTURES / name)
    again = fewshot.load(learner.save(tmp_path / "export"))
    written = json.loads((tmp_path / "export" / "fewshot.json").read_text())
    assert written["format_version"] == FORMAT_VERSION == 2 and "hyper_parameters" not in written
    assert {"backbone", "ways", "algorithm", "inner_optimizer", "preprocessing"} <= set(written)
    weights = safetensors.torch.load_file(tmp_path / "export" / "model.safetensors")
    assert not any(key.startswith("inner_lrs.") for key in weights)
    support, query = EXPECTED[f"{name}/support"], EXPECTED[f"{name}/query"]
    labels = [0, 1, 2] * 2
    assert torch.equal(again.adapt(support, labels).predict(query).probabilities,
                       learner.adapt(support, labels).predict(query).probabilities)
