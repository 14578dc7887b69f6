"""``fewshot fit --ckpt_path ...`` says which run and step it continues, reports a finished run
as finished, and refuses a checkpoint of other settings or of another checkpoint format."""

from __future__ import annotations

import re

import pytest
import torch
from test_exit_codes import Where

from fewshot.cli import main


def fit(where: Where, *options: str) -> None:
    main(where.fit("--checkpoint.every_n_train_steps=1", *options))


def last_checkpoint(where: Where):
    return max((where.tmp / "runs").rglob("last.ckpt"), key=lambda p: p.stat().st_mtime_ns)


def refused(where: Where, capsys, *options: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(where.fit(*options))
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert len(re.findall(r"^fewshot: error:", stderr, flags=re.MULTILINE)) == 1, stderr
    return stderr


def test_resuming_names_the_run_and_step_and_a_finished_run_is_reported_as_finished(
        fake_omniglot, tmp_path, capsys):
    where = Where(tmp_path, *fake_omniglot)
    fit(where, "--trainer.max_steps=1")
    capsys.readouterr()
    fit(where, "--trainer.max_steps=2", "--ckpt_path=last")
    first = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert f"Resuming run version_0 from step 1 of 2 ({first})" in capsys.readouterr().err
    assert torch.load(last_checkpoint(where), weights_only=True)["global_step"] == 2
    # The same command again: that run is done (it was "resumed" and trained nothing, silently).
    fit(where, "--trainer.max_steps=2", "--ckpt_path=last")
    stderr = capsys.readouterr().err
    assert re.search(r"--ckpt_path: run version_1 had already finished \(step 2 of "
                     r"--trainer.max_steps 2\); nothing is trained", stderr), stderr
    assert "Resuming" not in stderr


def test_resuming_with_other_settings_or_format_is_refused_naming_the_difference(
        fake_omniglot, tmp_path, capsys):
    where = Where(tmp_path, *fake_omniglot)
    fit(where, "--trainer.max_steps=1")
    checkpoint = last_checkpoint(where)
    fit(where, "--trainer.max_steps=2", f"--ckpt_path={checkpoint}")  # the same settings resume
    assert f"Resuming run version_0 from step 1 of 2 ({checkpoint})" in capsys.readouterr().err
    stderr = refused(where, capsys, f"--ckpt_path={checkpoint}", "--data.meta_batch_size=3")
    assert "data.meta_batch_size: 2 in the checkpoint, 3 now" in stderr, stderr
    stderr = refused(where, capsys, f"--ckpt_path={checkpoint}",
                     "--model.algorithm=fewshot.algorithms.Reptile")
    assert re.search(r"model.algorithm.class_path: 'fewshot.algorithms(.maml)?.MAML' in the "
                     r"checkpoint, 'fewshot.algorithms.Reptile' now", stderr), stderr
    stderr = refused(where, capsys, f"--ckpt_path={checkpoint}", "--data.dataset=folder",
                     f"--data.root={tmp_path}")
    assert "data.dataset: 'omniglot' in the checkpoint, 'folder' now" in stderr, stderr
    # --ckpt_path last does not pick a run of other settings: it starts a new run, and says why.
    with pytest.warns(UserWarning, match=r"none is resumed, a new run starts.*differs in "
                                         r"data.meta_batch_size: 2 in the checkpoint, 3 now"):
        fit(where, "--ckpt_path=last", "--data.meta_batch_size=3", "--trainer.max_steps=1")
    # A checkpoint of another format (a later fewshot's) is refused naming both.
    saved = torch.load(checkpoint, weights_only=True)
    saved["fewshot"] = {"version": "9.0.0", "checkpoint_format": 7}
    torch.save(saved, tmp_path / "future.ckpt")
    stderr = refused(where, capsys, f"--ckpt_path={tmp_path / 'future.ckpt'}")
    assert ("future.ckpt was written by fewshot 9.0.0 in checkpoint format 7; this fewshot "
            "(0.1.0) resumes format 1 only") in stderr, stderr
