"""Checkpoint ensembles at test time (fewshot.training.ensemble), as the MAML++ reference code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from episodes_for_tests import random_episodes, tiny_model

from fewshot.algorithms import MAML, Algorithm, MAMLPlusPlus
from fewshot.cli import main
from fewshot.execution import Loop
from fewshot.models import Conv4
from fewshot.training.ensemble import (
    ensemble_accuracies,
    ensemble_paths,
    ensemble_probabilities,
)
from fewshot.training.module import MetaLearner


def learner(algorithm: Algorithm, seed: int) -> MetaLearner:
    torch.manual_seed(seed)
    module = MetaLearner(Conv4(in_channels=1, hidden_channels=4, image_size=16), ways=3,
                         algorithm=algorithm, executor=Loop()).double()
    with torch.no_grad():  # batch-norm weights away from 1 and 0, so that adapting them matters
        tiny = tiny_model(seed=seed)
        for (name, p), (_, q) in zip(module.network.named_parameters(),
                                     tiny.named_parameters(), strict=False):
            if p.shape == q.shape and "blocks.1." in name:
                p.copy_(q)
    return module


ALGORITHMS = {
    "maml": lambda: MAML(inner_steps=2, inner_lr=0.3),
    "mamlpp": lambda: MAMLPlusPlus(inner_steps=2, inner_lr=0.3, learned_rates="per_tensor",
                                   per_step_bn_weights=True, batch_norm="transductive",
                                   derivative_order_annealing=False),
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_each_step_taken_once_gives_the_probabilities_of_adapting_afresh(name):
    # MAML's step_probabilities takes each step once; the base class adapts for 0, 1, 2 steps.
    module = learner(ALGORITHMS[name](), seed=0)
    episodes = random_episodes(tasks=1)
    params = dict(module.network.named_parameters())
    task = (episodes.support_x[0], episodes.support_y[0], episodes.query_x[0])
    fast = module.algorithm.step_probabilities(module.network, params, *task)
    general = Algorithm.step_probabilities(module.algorithm, module.network, params, *task)
    assert fast.shape == (3, 6, 3)
    torch.testing.assert_close(fast, general, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast.sum(-1), torch.ones(3, 6, dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_an_ensemble_of_one_scores_exactly_as_the_model(name):
    module = learner(ALGORITHMS[name](), seed=0)
    episodes = random_episodes(tasks=4, seed=3)
    single = module.run_tasks(episodes, training=False).accuracies
    assert torch.equal(ensemble_accuracies([module], episodes), single.to(torch.float64))


def test_the_ensemble_scores_the_mean_of_its_members_probabilities():
    members = [learner(MAML(inner_steps=1, inner_lr=0.3), seed=s) for s in (0, 1, 2)]
    episodes = random_episodes(tasks=2, seed=5)
    averaged = ensemble_probabilities(members, episodes)
    each = [ensemble_probabilities([m], episodes) for m in members]
    torch.testing.assert_close(averaged, sum(each) / 3, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(averaged, each[0])  # the members differ: the mean is news
    expected = (averaged.argmax(-1) == episodes.query_y.unsqueeze(1)).double().mean(-1)
    assert torch.equal(ensemble_accuracies(members, episodes), expected)


def test_checkpoints_are_named_by_path_pattern_or_top_k(tmp_path):
    for name in ("best-10.ckpt", "best-20.ckpt", "last.ckpt"):
        (tmp_path / name).write_bytes(b"x")
    best = [str(tmp_path / "best-20.ckpt"), str(tmp_path / "best-10.ckpt")]
    assert ensemble_paths(["top_k"], kept=best) == [Path(p) for p in best]
    assert ensemble_paths(["top_k"], main_checkpoint=best[0]) == sorted(map(Path, best))
    # Each file once, whichever way it was named.
    assert ensemble_paths([best[0], str(tmp_path / "best-*.ckpt")]) == [Path(best[0]), Path(best[1])]
    with pytest.raises(FileNotFoundError, match="no checkpoint matches"):
        ensemble_paths([str(tmp_path / "nothing-*.ckpt")])
    with pytest.raises(FileNotFoundError, match="missing.ckpt does not exist"):
        ensemble_paths([str(tmp_path / "missing.ckpt")])
    with pytest.raises(FileNotFoundError, match="save_top_k"):
        ensemble_paths(["top_k"], main_checkpoint=tmp_path / "elsewhere" / "best-1.ckpt")


def test_fit_keeps_the_best_k_and_tests_their_ensemble(fake_omniglot, tmp_path, capsys):
    root, cache = fake_omniglot
    common = [f"--data.root={root}", f"--data.cache_dir={cache}", "--data.ways=3",
              "--data.queries=2", "--data.meta_batch_size=2", "--data.eval_queries=2",
              "--data.val_episodes=4", "--data.test_episodes=6", "--data.steps_per_epoch=1",
              "--model.backbone.hidden_channels=4", "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={tmp_path}"]
    main(["fit", *common, "--trainer.max_steps=4", "--checkpoint.save_top_k=3",
          "--test_after_fit=true", "--ensemble=[top_k]"])
    assert "Testing an ensemble of 3 checkpoints" in capsys.readouterr().out
    run = next(tmp_path.rglob("test_results.json")).parent
    result = json.loads((run / "test_results.json").read_text())
    kept = sorted((run / "checkpoints").glob("best-*.ckpt"))
    assert len(kept) == 3 and len(result["ensemble"]) == 3
    assert {Path(m["checkpoint"]).name for m in result["ensemble"]} == {p.name for p in kept}
    # An ensemble of one checkpoint scores what that checkpoint scores alone, step by step.
    alone, one = tmp_path / "alone", tmp_path / "one"
    main(["test", *common, f"--ckpt_path={kept[0]}", f"--trainer.default_root_dir={alone}"])
    main(["test", *common, f"--ckpt_path={kept[0]}", f"--trainer.default_root_dir={one}",
          f"--ensemble=[{kept[0]}]"])
    first, second = (json.loads(next(d.rglob("test_results.json")).read_text()) for d in (alone, one))
    assert first["per_step"] == second["per_step"]
    assert "ensemble" not in first and second["ensemble"][0]["checkpoint"] == str(kept[0])


def test_a_regression_model_is_not_ensembled(tmp_path):
    from fewshot.models import MLP
    from fewshot.training.ensemble import load_members

    regression = MetaLearner(MLP(), task="regression")
    with pytest.raises(ValueError, match="regression"):
        load_members([tmp_path / "x.ckpt"], like=regression)
