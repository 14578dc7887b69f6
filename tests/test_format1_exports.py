"""Format-1 exports (written by fewshot before the architecture rebuild) still load and predict
exactly as the code that wrote them did (tests/fixtures/format1, see its script)."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

import fewshot

FIXTURES = Path(__file__).parent / "fixtures" / "format1"
EXPECTED = safetensors.torch.load_file(FIXTURES / "expected.safetensors")


@pytest.mark.parametrize("name", ["maml", "mamlpp", "anil_meta_sgd"])
@pytest.mark.parametrize("ways", [3, 4])
def test_a_format1_export_predicts_as_the_code_that_wrote_it(name, ways):
    learner = fewshot.load(FIXTURES / name)
    support = torch.cat([EXPECTED[f"{name}/support"]] * 2)[: 2 * ways]
    labels = [i % ways for i in range(2 * ways)]
    probabilities = learner.adapt(support, labels).predict(EXPECTED[f"{name}/query"]).probabilities
    torch.testing.assert_close(probabilities, EXPECTED[f"{name}/probabilities_{ways}way"],
                               rtol=1e-5, atol=1e-6)
