"""A byte flipped on disk (a bad sector, a bit flip in a copy) is found before it is used.

The decoded dataset cache carries a CRC-32 of its pixels (rebuilt when it does not match), a
checkpoint the CRC-32s ``torch.save`` writes per record but ``torch.load`` never checks, an
export the SHA-256 of its weights."""

from __future__ import annotations

import re
import struct
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from test_exit_codes import Where, image_tree

from fewshot.cli import main
from fewshot.data.omniglot import Omniglot
from fewshot.inference.checkpoints import read_model
from fewshot.inference.export import CheckpointError, write_export


def flip_one_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def flip_a_bit_of_the_first_tensor(checkpoint: Path) -> None:
    """Flip one bit in the middle of the checkpoint's first tensor storage (``data/0``)."""
    with zipfile.ZipFile(checkpoint) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    with checkpoint.open("rb") as file:
        file.seek(info.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", file.read(4))
    start = info.header_offset + 30 + name_length + extra_length
    flip_one_bit(checkpoint, start + info.file_size // 2)


def save_a_checkpoint(where: Where, folder: Path, *options: str) -> Path:
    """``folder/last.ckpt`` of an untrained model, written by the CLI's own Trainer."""
    from fewshot.training.cli import build_cli

    cli = build_cli(where.fit(*options)[1:], run=False)
    cli.trainer.strategy.connect(cli.model)
    cli.trainer.datamodule = cli.datamodule
    cli.trainer.save_checkpoint(folder / "last.ckpt")
    return folder / "last.ckpt"


def test_a_flipped_byte_in_the_dataset_cache_is_named_and_rebuilt(fake_root, tmp_path):
    cache = tmp_path / "cache"
    good = Omniglot(fake_root, class_split="lake", cache_dir=cache).load_class_images(3, [1, 2])
    (array,) = (cache / "omniglot").glob("*.npy")
    flip_one_bit(array, array.stat().st_size - 1000)  # a pixel, far from the header
    with pytest.warns(UserWarning, match=rf"corrupt cache .*{array.name}: its pixels do not "
                                         r"match the CRC-32"):
        again = Omniglot(fake_root, class_split="lake", cache_dir=cache)
    assert torch.equal(again.load_class_images(3, [1, 2]), good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt: the next run finds it whole
        Omniglot(fake_root, class_split="lake", cache_dir=cache)


def test_a_flipped_byte_in_a_checkpoint_is_named_before_it_is_used(fake_omniglot, tmp_path,
                                                                   capsys):
    where = Where(tmp_path, *fake_omniglot)
    folder = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints"
    checkpoint = save_a_checkpoint(where, folder)
    assert torch.load(checkpoint, weights_only=True)["fewshot"]["checkpoint_format"] == 1
    flip_a_bit_of_the_first_tensor(checkpoint)
    torch.load(checkpoint, weights_only=True)  # torch alone loads it: a silently wrong weight
    message = rf"{checkpoint.name} is corrupt: record .*data/0 does not match the CRC-32"
    with pytest.raises(CheckpointError, match=message):
        read_model(checkpoint)  # adapt, export
    for argv in (where.fit(f"--ckpt_path={checkpoint}", subcommand="test"),  # test
                 where.fit("--ckpt_path=last"),  # resume, as found by --ckpt_path last
                 where.fit(f"--ckpt_path={checkpoint}")):  # resume, named
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2, stderr
        assert "Traceback" not in stderr
        assert len(re.findall(message, stderr)) == 1, stderr


def test_a_flipped_byte_in_an_exports_weights_is_named_by_adapt(fake_omniglot, tmp_path, capsys):
    where = Where(tmp_path, *fake_omniglot)
    checkpoint = save_a_checkpoint(where, tmp_path / "checkpoints")
    export = write_export(read_model(checkpoint), tmp_path / "export")
    weights = export / "model.safetensors"
    flip_one_bit(weights, weights.stat().st_size - 8)  # the last weight's last bytes
    images = image_tree(tmp_path / "images")
    with pytest.raises(SystemExit) as exit_info:
        main(["adapt", "--checkpoint", str(export), "--support", str(images / "train"),
              "--query", str(images / "test")])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2, stderr
    assert "model.safetensors is corrupt: its SHA-256 differs from the one recorded" in stderr
