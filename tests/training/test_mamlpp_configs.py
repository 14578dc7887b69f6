"""The two sets of MAML++ configs: as the paper describes it, and as its reference code runs it."""

from __future__ import annotations

import pytest
import yaml

from fewshot.configs import config_names, config_path, describe_config

SETTINGS = ["omniglot_5way_1shot", "omniglot_5way_5shot", "omniglot_20way_1shot",
            "omniglot_20way_5shot", "mini_imagenet_5way_1shot", "mini_imagenet_5way_5shot"]


def load(name: str) -> dict:
    return yaml.safe_load(config_path(name).read_text())


@pytest.mark.parametrize("setting", SETTINGS)
def test_paper_and_reference_configs_differ_where_paper_and_code_do(setting):
    paper, reference = load(f"mamlpp_paper_{setting}"), load(f"mamlpp_reference_{setting}")
    paper_algorithm = paper["model"]["algorithm"]["init_args"]
    reference_algorithm = reference["model"]["algorithm"]["init_args"]
    # The paper: per-step running statistics at test, derivative-order annealing, top-3.
    assert paper_algorithm["batch_norm"] == "per_step_running"
    assert paper_algorithm["derivative_order_annealing"] is True
    assert paper["checkpoint"]["save_top_k"] == 3
    # The reference code: batch statistics at test, second order throughout, top-5.
    assert reference_algorithm["batch_norm"] == "transductive"
    assert reference_algorithm["derivative_order_annealing"] is False
    assert reference["checkpoint"]["save_top_k"] == 5
    for config in (paper, reference):
        assert config["ensemble"] == ["top_k"] and config["test_after_fit"] is True
    # Everything else is the same experiment.
    for key in ("inner_steps", "inner_lr", "learned_rates", "multi_step_loss", "per_step_bn_weights"):
        assert paper_algorithm[key] == reference_algorithm[key], key
    assert {k: v for k, v in paper["data"].items() if k != "eval_queries"} == \
        {k: v for k, v in reference["data"].items() if k != "eval_queries"}
    # Each says what it follows, by name.
    assert describe_config(f"mamlpp_paper_{setting}").startswith("MAML++ as the paper describes it")
    assert describe_config(f"mamlpp_reference_{setting}").startswith(
        "MAML++ as its reference code runs it")
    assert f"mamlpp_reference_{setting}" in config_path(f"mamlpp_paper_{setting}").read_text()
    assert "experiment_config/" in config_path(f"mamlpp_reference_{setting}").read_text()


def test_every_mamlpp_config_is_one_of_the_two_sets_or_the_cpu_one():
    names = [n for n in config_names() if n.startswith("mamlpp_")]
    assert sorted(names) == sorted(["mamlpp_omniglot_5way_1shot_cpu",
                                    *(f"mamlpp_paper_{s}" for s in SETTINGS),
                                    *(f"mamlpp_reference_{s}" for s in SETTINGS)])
