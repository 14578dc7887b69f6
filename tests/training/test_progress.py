"""Progress bars that say how far a run is, never "Epoch 0/-2"."""

from __future__ import annotations

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Timer

from fewshot.training.progress import MetaProgressBar, MetaRichProgressBar, run_progress


def test_a_time_limited_run_shows_elapsed_and_left(tmp_path, monkeypatch):
    bar = MetaRichProgressBar()
    trainer = Trainer(max_time="00:00:20:00", max_steps=-1, logger=False, callbacks=[bar],
                      default_root_dir=tmp_path)
    timer = next(c for c in trainer.callbacks if isinstance(c, Timer))
    monkeypatch.setattr(timer, "time_elapsed", lambda stage="train": 200.0)
    assert run_progress(trainer) == {"iteration": "0", "elapsed": "3:20", "left": "16:40"}
    trainer.fit_loop.max_epochs = -1  # what a run limited by time or steps has
    bar._trainer = trainer
    assert bar._get_train_description(0).strip() == "Epoch 0"  # not "Epoch 0/-2"


def test_a_step_limited_run_shows_its_total(tmp_path):
    trainer = Trainer(max_steps=60000, logger=False, callbacks=[MetaProgressBar()],
                      default_root_dir=tmp_path)
    assert run_progress(trainer) == {"iteration": "0/60000"}
    epochs = Trainer(max_epochs=10, logger=False, callbacks=[MetaRichProgressBar()],
                     default_root_dir=tmp_path)
    bar = next(c for c in epochs.callbacks if isinstance(c, MetaRichProgressBar))
    bar._trainer = epochs
    assert bar._get_train_description(3).strip() == "Epoch 3/9"


def test_the_cli_uses_them(capsys):
    from fewshot.training.cli import build_cli

    cli = build_cli(["--trainer.max_steps=1"], run=False)
    assert any(isinstance(c, (MetaProgressBar, MetaRichProgressBar))
               for c in cli.trainer.callbacks)
