"""Gradient tracking, the default loggers and `fewshot report` on a tiny real run."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from PIL import Image

from fewshot.algorithms import MAML, MetaSGD
from fewshot.cli import main
from fewshot.models import Conv4
from fewshot.training.callbacks import TestResultsWriter, Throughput
from fewshot.training.datamodule import FewShotDataModule
from fewshot.training.loggers import RunLogger
from fewshot.training.module import MetaLearner
from fewshot.training.observability import (
    MetaGradientMonitor,
    histogram_due,
    log_magnitude_histogram,
)
from fewshot.training.original_flags import translate_original_flags
from fewshot.training.report import column_edges, write_report


class GradientRecorder(Callback):
    def __init__(self) -> None:
        self.gradients: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.gradients.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})


def tiny_fit(fake_omniglot, tmp_path, algorithm=None):
    """Three meta-steps of 2-step MAML (or ``algorithm``) on 3-way tasks, then a test."""
    root, cache = fake_omniglot
    data = FewShotDataModule(root=str(root), cache_dir=str(cache), ways=3, queries=2,
                             meta_batch_size=2, eval_queries=2, val_episodes=2, test_episodes=3,
                             steps_per_epoch=3, image_size=28)
    torch.manual_seed(0)
    algorithm = MAML(inner_steps=2) if algorithm is None else algorithm
    model = MetaLearner(Conv4(1, 4, 28), ways=3, algorithm=algorithm)
    recorder = GradientRecorder()
    logger = RunLogger(save_dir=str(tmp_path), name="runs")
    trainer = Trainer(max_steps=3, default_root_dir=tmp_path, logger=logger, inference_mode=False,
                      enable_progress_bar=False, enable_checkpointing=False, log_every_n_steps=1,
                      val_check_interval=3,
                      callbacks=[MetaGradientMonitor(2.0, log_every_n_steps=1,
                                                     histogram_every_n_steps=1), recorder,
                                 Throughput(), TestResultsWriter()])
    trainer.fit(model, datamodule=data)
    trainer.test(model, datamodule=data)
    return trainer, recorder


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_meta_gradient_norms_equal_a_hand_computation(fake_omniglot, tmp_path):
    trainer, recorder = tiny_fit(fake_omniglot, tmp_path)
    rows = [r for r in read_csv(tmp_path / "runs" / "version_0" / "metrics.csv")
            if r.get("meta_grad/grad_2.0_norm_total")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    for row, gradients in zip(rows, recorder.gradients, strict=True):
        by_hand = torch.sqrt(sum(g.double().square().sum() for g in gradients.values()))
        assert float(row["meta_grad/grad_2.0_norm_total"]) == pytest.approx(by_hand.item(), rel=1e-4)
        head = gradients["network.head.weight"].double().norm()
        assert float(row["meta_grad/grad_2.0_norm/network.head.weight"]) == pytest.approx(head.item(), rel=1e-4)
        assert float(row["train/inner_grad_norm/step_0"]) > 0


def test_loggers_write_csv_tensorboard_and_histograms(fake_omniglot, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_fit(fake_omniglot, tmp_path, MAML(inner_steps=2, learned_rates="per_tensor"))
    run = tmp_path / "runs" / "version_0"
    columns = read_csv(run / "metrics.csv")[0].keys()
    for name in ("train/loss", "train/acc", "val/acc", "val/loss", "test/acc", "train/elapsed_s", "val/elapsed_s",
                 "inner_lr/head.weight/step_1", "inner_lr/features.blocks.0.weight/step_0"):
        assert name in columns, name
    events = EventAccumulator(str(run), size_guidance={"histograms": 0}).Reload()
    assert len(events.Scalars("train/loss")) == 3
    assert "meta_grad/network.head.weight" in events.Tags()["histograms"]
    records = [json.loads(line) for line in (run / "histograms.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    total = sum(p.numel() for p in MetaLearner(
        Conv4(1, 4, 28), 3, MAML(inner_steps=2, learned_rates="per_tensor")).parameters())
    assert sum(records[0]["meta_grad"]) == total  # every gradient entry counted once


def test_histogram_snapshots_double_their_interval_so_any_run_has_a_few_dozen():
    due = [step for step in range(171) if histogram_due(step)]
    assert due[:17] == list(range(17)) and due[16:19] == [16, 18, 20]
    assert due[-3:] == [152, 160, 168] and len(due) == 56  # the 2-minute run: 56, not 1
    assert 100 < sum(histogram_due(step) for step in range(50_000)) < 200
    monitor = MetaGradientMonitor()
    assert [s for s in range(40) if monitor._histogram_due(s)] == due[:len([d for d in due if d < 40])]
    assert [s for s in range(9) if MetaGradientMonitor(histogram_every_n_steps=4)._histogram_due(s)] == [0, 4, 8]
    assert not any(MetaGradientMonitor(histogram_every_n_steps=0)._histogram_due(s) for s in range(9))


def test_the_histogram_figure_puts_each_snapshot_at_its_meta_iteration():
    assert column_edges([0, 1, 2, 40, 100]) == [-0.5, 0.5, 1.5, 21, 70, 100.5]
    assert column_edges([0]) == [-0.5, 0.5]


def test_log_magnitude_histogram_bins():
    counts = log_magnitude_histogram(torch.tensor([0.0, 1e-13, 1e-6, -1e-6, 1e3]))
    assert sum(counts) == 5
    assert counts[0] == 2 and counts[-1] == 1  # zero and tiny at the left edge, 1e3 clipped right
    assert max(counts[1:-1]) == 2  # +-1e-6 share a bin


def test_report_draws_every_figure_of_a_real_run(fake_omniglot, tmp_path, capsys):
    tiny_fit(fake_omniglot, tmp_path, MAML(inner_steps=2, learned_rates="per_tensor"))
    run = tmp_path / "runs" / "version_0"
    capsys.readouterr()  # drop the training output
    main(["report", str(tmp_path / "runs")])  # the parent folder finds the newest run
    written = capsys.readouterr().out.split()
    names = {p.rsplit("/", 1)[-1] for p in written}
    assert names == {"loss_accuracy.png", "grad_norm.png", "grad_histograms.png",
                     "test_per_step.png", "inner_lrs.png", "report.md"}
    for name in names - {"report.md"}:
        path = run / "report" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            low, high = image.convert("L").getextrema()
            assert high - low > 50, name  # not a blank canvas
    training = json.loads((run / "test_results.json").read_text())["training"]
    assert training["meta_iterations"] == 3 and training["wall_time_s"] > 0
    summary = (run / "report" / "report.md").read_text()
    assert "Test accuracy" in summary and "Best validation accuracy" in summary
    assert "inner_steps: 2" in summary or "Configuration" not in summary


def test_report_skips_missing_data_and_names_a_bad_folder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,step,train/loss\n0,0,1.5\n0,1,1.2\n")
    files = write_report(run)
    assert [f.name for f in files] == ["loss_accuracy.png", "report.md"]
    assert "grad_histograms.png: not drawn" in (run / "report" / "report.md").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["report", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "missing" in capsys.readouterr().err


def test_original_project_flags_for_observability():
    pytest.importorskip("wandb")
    norm, loggers = translate_original_flags(["--track_grad_norm=2", "--wandb"])
    assert norm == "--grad_monitor.norm_type=2"
    assert loggers.startswith("--trainer.logger=") and "WandbLogger" in loggers


def test_nonfinite_gradients_are_left_out_of_histograms_instead_of_crashing(tmp_path):
    """A step that --nonfinite.policy skip will skip still reaches the histogram callbacks first."""
    from fewshot.training.loggers import log_histogram
    from fewshot.training.observability import log_magnitude_histogram

    values = torch.tensor([float("nan"), float("inf"), 1.0, 0.01])
    assert sum(log_magnitude_histogram(values)) == 2
    logger = RunLogger(save_dir=str(tmp_path), name="runs")
    log_histogram(logger, "meta_grad/x", values, step=0)
    log_histogram(logger, "meta_grad/all_nan", torch.full((3,), float("nan")), step=0)
    logger.finalize("success")


def test_meta_sgd_rates_are_logged_as_each_steps_mean(fake_omniglot, tmp_path):
    trainer, _ = tiny_fit(fake_omniglot, tmp_path, MetaSGD(inner_steps=2, inner_lr=0.3))
    rows = read_csv(tmp_path / "runs" / "version_0" / "metrics.csv")
    logged = [float(r["inner_lr/head.weight/step_1"]) for r in rows if r.get("inner_lr/head.weight/step_1")]
    assert len(logged) == 3 and logged[0] == pytest.approx(0.3, abs=0.01)  # starts at inner_lr
    # The last value logged is the mean over the entries of the rates at that step.
    rates = trainer.lightning_module.algorithm.meta_parameters(detach=True)["head.weight"]
    assert rates.shape[0] == 2 and rates.shape[1:] == (3, 4 * 1 * 1)  # [steps, *head.weight]
    assert len({round(v, 9) for v in logged}) > 1  # the rates are learned: they moved


def test_the_default_loggers_experiment_is_tensorboards_writer(fake_omniglot, tmp_path):
    """Lightning's idiom self.logger.experiment.add_image(...) works; the CSV still fills."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    class ImageLogger(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            pl_module.logger.experiment.add_image(
                "support/first", batch.support_x[0, 0], global_step=trainer.global_step)

    root, cache = fake_omniglot
    data = FewShotDataModule(root=str(root), cache_dir=str(cache), ways=3, queries=2,
                             meta_batch_size=2, eval_queries=2, val_episodes=2,
                             steps_per_epoch=2, image_size=28)
    logger = RunLogger(save_dir=str(tmp_path), name="runs")
    trainer = Trainer(max_steps=2, logger=logger, inference_mode=False, log_every_n_steps=1,
                      enable_progress_bar=False, enable_checkpointing=False,
                      limit_val_batches=0, callbacks=[ImageLogger()])
    trainer.fit(MetaLearner(Conv4(1, 4, 28), ways=3), datamodule=data)
    run = tmp_path / "runs" / "version_0"
    events = EventAccumulator(str(run), size_guidance={"images": 0}).Reload()
    assert len(events.Images("support/first")) == 2
    assert [int(r["step"]) for r in read_csv(run / "metrics.csv") if r.get("train/loss")] == [0, 1]
    assert (run / "hparams.yaml").is_file()
