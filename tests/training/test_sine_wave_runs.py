"""Sine-wave regression through the real CLI: fit, per-step MSE with intervals, checkpoints by
lowest MSE, the report's picture; and the paper's baseline (MAML without an inner loop)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fewshot.algorithms import MAML
from fewshot.cli import main
from fewshot.data.sinusoid import SinusoidMetaBatches
from fewshot.models import MLP
from fewshot.training.module import MetaLearner
from fewshot.training.report import write_report
from fewshot.training.sine_figure import draw_sine_figure, figure_tasks, predictions

TINY = ["--model.backbone.init_args.hidden_features=[8,8]", "--data.meta_batch_size=4",
        "--data.val_episodes=5", "--data.test_episodes=6", "--data.eval_queries=20",
        "--trainer.max_steps=4", "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def sine_run(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sine-run")
    main(["fit", "-c", "maml_sinusoid_10shot", *TINY, f"--trainer.default_root_dir={directory}"])
    return directory / "lightning_logs" / "version_0"


def test_fit_reports_the_mse_after_every_inner_step_with_its_interval(sine_run):
    result = json.loads((sine_run / "test_results.json").read_text())
    assert result["metric"] == "mse" and "accuracy" not in result
    assert result["episodes"] == 6 and result["shots"] == 10 and result["inner_steps"] == 10
    rows = result["per_step"]
    assert [r["inner_step"] for r in rows] == list(range(11))
    assert all(r["mse"] > 0 and r["ci95"] > 0 for r in rows)
    assert result["mse"] == rows[-1]["mse"]
    assert result["provenance"]["dataset"] == "sinusoid"
    assert result["provenance"]["test_episodes_sha256"]
    metrics = (sine_run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/mse", "val/mse_ci95", "test/mse", "train/loss"} <= set(metrics)
    assert "train/acc" not in metrics and "val/acc" not in metrics


def test_the_best_checkpoint_is_the_lowest_validation_mse(sine_run):
    config = (sine_run / "config.yaml").read_text()
    assert "monitor: val/mse" in config and "mode: min" in config
    best = sorted((sine_run / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1
    checkpoint = torch.load(best[0], weights_only=True)
    assert checkpoint["hyper_parameters"]["task"] == "regression"
    callback = next(v for k, v in checkpoint["callbacks"].items() if "ModelCheckpoint" in k)
    assert callback["monitor"] == "val/mse"
    model = MetaLearner.load_from_checkpoint(best[0])
    assert model.regression and model.network(torch.zeros(3, 1)).shape == (3, 1)


def test_the_report_draws_the_sine_picture(sine_run):
    written = {p.name for p in write_report(sine_run)}
    assert {"sinusoid.png", "test_per_step.png", "report.md"} <= written
    assert (sine_run / "report" / "sinusoid.png").stat().st_size > 10_000
    assert "**Test MSE**" in (sine_run / "report" / "report.md").read_text()


def test_an_image_run_gets_no_sine_picture(tmp_path):
    from fewshot.training.sine_figure import draw_run

    (tmp_path / "config.yaml").write_text("data:\n  dataset: omniglot\n  shots: 1\n")
    assert draw_run(tmp_path, tmp_path / "sinusoid.png") is False
    assert not (tmp_path / "sinusoid.png").exists()


def test_the_figure_draws_each_model_and_step(tmp_path):
    torch.manual_seed(0)
    models = {name: MetaLearner(MLP(1, [8]), ways=1, task="regression",
                                algorithm=MAML(inner_steps=steps, inner_lr=0.01,
                                               eval_inner_steps=10))
              for name, steps in (("MAML", 1), ("pretrained", 0))}
    tasks = figure_tasks(seed=0, shots=5, count=2)
    assert [len(sx) for _, sx, _ in tasks] == [5, 5]
    curves = {name: {row: predictions(model, sx, sy, [0, 1, 10])
                     for row, (_, sx, sy) in enumerate(tasks)} for name, model in models.items()}
    assert set(curves["MAML"][0]) == {0, 1, 10} and curves["MAML"][0][1].shape == (200,)
    assert not torch.equal(curves["MAML"][0][0], curves["MAML"][0][10])  # it adapted
    path = draw_sine_figure(tmp_path / "figure" / "sine.png", tasks, curves)
    assert path.read_bytes().startswith(b"\x89PNG")


def test_the_pretrained_baseline_regresses_all_tasks_jointly_then_fine_tunes_with_sgd():
    """The paper's baseline is MAML with no inner step in training: its meta-gradient is the
    gradient of the joint mean squared error over every task's points, and evaluation
    fine-tunes it on the K support points with plain SGD steps."""
    torch.manual_seed(0)
    baseline = MetaLearner(MLP(1, [8, 8]), ways=1, task="regression",
                           algorithm=MAML(inner_steps=0, eval_inner_steps=3, eval_inner_lr=0.02))
    batch = SinusoidMetaBatches(5, 10, tasks_per_batch=4, seed=0, length=1)[0]
    loss, _ = baseline.meta_loss(batch, epoch=0)
    params = dict(baseline.network.named_parameters())
    joint = F.mse_loss(baseline.network(batch.query_x.reshape(-1, 1)), batch.query_y.reshape(-1, 1))
    for got, expected in zip(torch.autograd.grad(loss, list(params.values())),
                             torch.autograd.grad(joint, list(params.values())), strict=True):
        torch.testing.assert_close(got, expected)

    results = baseline.run_tasks(batch, training=False)
    sx, sy, qx, qy = (part[1] for part in batch)
    tuned = {n: p.detach().clone() for n, p in params.items()}
    by_hand = []
    for _ in range(4):
        by_hand.append(F.mse_loss(functional_call(baseline.network, tuned, (qx,)), qy))
        for p in tuned.values():
            p.requires_grad_()
        support = F.mse_loss(functional_call(baseline.network, tuned, (sx,)), sy)
        grads = torch.autograd.grad(support, list(tuned.values()))
        tuned = {n: (p - 0.02 * g).detach() for (n, p), g in zip(tuned.items(), grads, strict=True)}
    torch.testing.assert_close(results.losses[1], torch.stack(by_hand))
