"""fewshot's checkpoint writer: a checkpoint file is always a complete checkpoint, whatever
filesystem the temporary folder is on; a damaged one is named when it is read."""

from __future__ import annotations

import os
import stat
import tempfile

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from fewshot.inference.export import CheckpointError
from fewshot.training.checkpoint_io import AtomicCheckpointIO
from fewshot.training.cli import build_cli


def checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((1000,), value)}, "global_step": int(value)}


def test_a_checkpoint_is_renamed_over_the_last_one_only_once_complete(tmp_path, monkeypatch):
    # The system's temporary folder may be on another filesystem (a tmpfs /tmp), where a move is
    # a copy into the target; Lightning's own writer goes through it. This one never does.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    target = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint(1.0), target)
    replace = os.replace
    renames = []

    def checked_replace(source, destination):
        source, destination = os.fspath(source), os.fspath(destination)
        assert os.path.dirname(source) == os.path.dirname(destination)  # one filesystem
        assert torch.load(source, weights_only=True)["global_step"] == 2  # complete and synced
        assert torch.load(destination, weights_only=True)["global_step"] == 1  # untouched so far
        renames.append(os.path.basename(source))
        replace(source, destination)

    monkeypatch.setattr(os, "replace", checked_replace)
    io.save_checkpoint(checkpoint(2.0), target)
    assert len(renames) == 1 and renames[0].startswith(".last.ckpt.")
    assert io.load_checkpoint(target)["global_step"] == 2
    assert os.listdir(target.parent) == ["last.ckpt"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_write_that_fails_half_way_leaves_the_last_checkpoint_and_no_debris(tmp_path,
                                                                              monkeypatch):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint(1.0), target)
    save = torch.save

    def disk_full(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint(checkpoint(2.0), target)
    monkeypatch.setattr(torch, "save", save)
    assert io.load_checkpoint(target)["global_step"] == 1
    assert os.listdir(tmp_path) == ["last.ckpt"]


def test_the_next_save_removes_what_a_killed_write_left(tmp_path):
    leftover = tmp_path / ".last.ckpt.k1ll3d.tmp"
    leftover.write_bytes(b"PK\x03\x04 half a zip")
    other = tmp_path / ".best-3.ckpt.k1ll3d.tmp"  # another checkpoint's: not this save's business
    other.write_bytes(b"PK")
    AtomicCheckpointIO().save_checkpoint(checkpoint(1.0), tmp_path / "last.ckpt")
    assert sorted(os.listdir(tmp_path)) == [other.name, "last.ckpt"]


def test_reading_a_damaged_checkpoint_names_it(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint(1.0), tmp_path / "whole.ckpt")
    (tmp_path / "half.ckpt").write_bytes((tmp_path / "whole.ckpt").read_bytes()[:3000])
    with pytest.raises(CheckpointError, match=r"half.ckpt is corrupt or not a PyTorch checkpoint"):
        io.load_checkpoint(tmp_path / "half.ckpt")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        io.load_checkpoint(tmp_path / "missing.ckpt")


def test_the_cli_writes_checkpoints_atomically_unless_told_otherwise():
    assert type(build_cli([], run=False).trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    chosen = build_cli(["--trainer.plugins=lightning.pytorch.plugins.io.TorchCheckpointIO"],
                       run=False)
    assert type(chosen.trainer.strategy.checkpoint_io) is TorchCheckpointIO
