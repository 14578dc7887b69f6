import math

import pytest
import torch

from fewshot.core.evaluation import mean_and_ci95, summarise_per_step


def test_ci95_by_hand():
    values = torch.tensor([0.6, 0.8, 1.0, 0.8])
    # mean 0.8; sample variance ((0.2^2)*2 + 0)/3 = 0.08/3; std 0.163299; 1.96*std/2 = 0.160033
    mean, ci = mean_and_ci95(values)
    assert mean == pytest.approx(0.8)
    assert ci == pytest.approx(1.96 * math.sqrt(0.08 / 3) / 2)
    assert ci == pytest.approx(0.1600333, abs=1e-6)


def test_single_value_and_empty():
    assert math.isnan(mean_and_ci95(torch.tensor([0.5]))[1])
    with pytest.raises(ValueError, match="no episodes"):
        mean_and_ci95(torch.tensor([]))


def test_summarise_per_step_rows():
    accuracies = torch.tensor([[0.2, 0.6], [0.2, 1.0]])
    rows = summarise_per_step(accuracies)
    assert [r["inner_step"] for r in rows] == [0, 1]
    assert rows[0]["accuracy"] == pytest.approx(0.2) and rows[0]["ci95"] == 0.0
    assert rows[1]["accuracy"] == pytest.approx(0.8)


def test_test_summary_and_its_text():
    from fewshot.core.evaluation import format_test_result, summarise_test

    result = summarise_test(torch.tensor([[0.2, 0.6], [0.2, 1.0]]), 5, 1, 1, 0.4)
    assert result["episodes"] == 2 and result["accuracy"] == pytest.approx(0.8)
    text = format_test_result(result)
    assert text.startswith("Test accuracy over 2 episodes (5-way 1-shot, mean +- 95% CI):")
    assert "after 1 step(s): 80.00 +- " in text


def test_regression_summary_names_its_metric_mse():
    from fewshot.core.evaluation import format_test_result, summarise_test

    errors = torch.tensor([[4.0, 1.0, 0.5], [2.0, 3.0, 0.5]])  # [tasks, steps + 1]
    result = summarise_test(errors, 1, 10, 2, 0.01, metric="mse")
    assert result["metric"] == "mse" and "accuracy" not in result
    assert result["mse"] == pytest.approx(0.5) and result["ci95"] == 0.0
    assert [r["mse"] for r in result["per_step"]] == pytest.approx([3.0, 2.0, 0.5])
    assert result["per_step"][1]["ci95"] == pytest.approx(1.96 * math.sqrt(2.0) / math.sqrt(2))
    text = format_test_result(result)
    assert text.startswith("Test MSE over 2 tasks (10-shot, mean +- 95% CI):")
    assert "after 1 step(s): 2.0000 +- 1.9600" in text and "%" not in text.split("\n", 1)[1]
    # Classification records keep their shape: no metric key, accuracy in percent.
    assert "metric" not in summarise_test(errors / 4, 5, 1, 2, 0.4)
