"""Exports and checkpoints: round trips, and every damaged or hostile file refused by name."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile

import pytest
import safetensors.torch
import torch
import yaml
from tiny_runs import TRAINED_WAYS, trained_once

import fewshot
from fewshot.inference.checkpoints import read_model
from fewshot.inference.export import FORMAT_VERSION, CheckpointError, ModelFiles, read_export, write_export


@pytest.fixture(scope="session")
def run(_shared_fake_root, tmp_path_factory):
    return trained_once(_shared_fake_root, tmp_path_factory)


@pytest.fixture
def export(run, tmp_path):
    return fewshot.load(run).save(tmp_path / "export")


def predictions_of(learner, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    support = torch.rand(2 * TRAINED_WAYS, 1, 28, 28, generator=generator)
    query = torch.rand(7, 1, 28, 28, generator=generator)
    labels = list(range(TRAINED_WAYS)) * 2
    return learner.adapt(support, labels).predict(query).probabilities


class PicklePayload:
    """Unpickling this creates ``path``: the stand-in for any code a hostile file would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_export_round_trips_to_identical_predictions(run, export):
    assert sorted(p.name for p in export.iterdir()) == ["fewshot.json", "model.safetensors"]
    assert torch.equal(predictions_of(fewshot.load(export)), predictions_of(fewshot.load(run)))
    for path in (export / "fewshot.json", export / "model.safetensors"):  # either file will do
        assert torch.equal(predictions_of(fewshot.load(path)), predictions_of(fewshot.load(run)))


def test_export_metadata_holds_everything_needed_to_rebuild_the_model(run, export):
    metadata = json.loads((export / "fewshot.json").read_text())
    assert metadata["format"] == "fewshot-export" and metadata["format_version"] == FORMAT_VERSION
    assert metadata["backbone"] == {"class_path": "fewshot.models.Conv4", "init_args": {
        "hidden_channels": 8, "in_channels": 1, "image_size": 28, "norm_layer": {
            "class_path": "fewshot.models.TransductiveBatchNorm2d", "init_args": {"eps": 1e-5}}}}
    hyper_parameters = metadata["hyper_parameters"]
    assert hyper_parameters["ways"] == TRAINED_WAYS and hyper_parameters["eval_inner_steps"] == 2
    assert {"inner_steps", "inner_lr", "eval_inner_lr", "first_order"} <= set(hyper_parameters)
    assert metadata["preprocessing"] == {"channels": 1, "image_size": 28, "invert": True,
                                         "mean": [0.0], "std": [1.0], "resize": "lanczos"}
    assert metadata["source"]["checkpoint"].endswith(".ckpt") and metadata["source"]["dataset"] == "omniglot"
    weights = safetensors.torch.load_file(export / "model.safetensors")
    checkpoint = torch.load(next(run.glob("checkpoints/best*.ckpt")), weights_only=True)
    assert weights.keys() == checkpoint["state_dict"].keys()


def test_a_mamlpp_model_exports_its_learned_rates_and_per_step_batch_norm(
        _shared_fake_root, tmp_path_factory, tmp_path):
    mamlpp = trained_once(_shared_fake_root, tmp_path_factory, mamlpp=True)
    learner = fewshot.load(mamlpp)
    exported = fewshot.load(learner.save(tmp_path / "export"))
    weights = safetensors.torch.load_file(tmp_path / "export" / "model.safetensors")
    assert any(name.startswith("inner_lrs.") for name in weights)
    assert weights["network.features.blocks.1.running_mean"].shape == (2, 8)  # 1 train step + 1
    assert exported.metadata["hyper_parameters"]["batch_norm"] == "per_step_running"
    assert learner.lr is None and exported.lr is None  # learned rates, not one number
    assert not learner.batch_dependent  # running statistics: every image on its own
    assert torch.equal(predictions_of(exported), predictions_of(learner))
    bare = tmp_path / "bare.ckpt"  # no config.yaml: the backbone is inferred from the weights
    shutil.copy(next(mamlpp.glob("checkpoints/best*.ckpt")), bare)
    assert torch.equal(predictions_of(fewshot.load(bare)), predictions_of(learner))


def test_tensors_beyond_the_network_survive_an_export(run, tmp_path):
    # Learned extras (e.g. MAML++ per-step learning rates) are simply more state_dict entries.
    model = read_model(run)
    extra = {**model.state_dict, "inner_lrs.step_0": torch.tensor([0.1, 0.2])}
    again = read_export(write_export(ModelFiles(model.metadata, extra, model.source), tmp_path))
    assert again.state_dict.keys() == extra.keys()
    assert all(torch.equal(again.state_dict[k], v) for k, v in extra.items())


def test_a_run_folder_its_parent_and_its_checkpoint_files_all_load(run):
    expected = predictions_of(fewshot.load(run))
    assert fewshot.load(run).model_files.source.name.startswith("best")
    assert torch.equal(predictions_of(fewshot.load(run.parent.parent)), expected)
    assert torch.equal(predictions_of(fewshot.load(next(run.glob("checkpoints/best*.ckpt")))), expected)
    assert fewshot.load(run / "checkpoints" / "last.ckpt").ways == TRAINED_WAYS


def test_a_bare_checkpoint_without_its_config_infers_the_backbone(run, tmp_path):
    bare = tmp_path / "model.ckpt"
    shutil.copy(next(run.glob("checkpoints/best*.ckpt")), bare)
    assert torch.equal(predictions_of(fewshot.load(bare)), predictions_of(fewshot.load(run)))


def test_a_checkpoint_that_does_not_say_how_images_were_prepared_is_refused(run, tmp_path):
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    del checkpoint["datamodule_hyper_parameters"]
    torch.save(checkpoint, tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match="model.ckpt does not say how its training images were prepared"):
        fewshot.load(tmp_path / "model.ckpt")


@pytest.mark.parametrize(("save", "message"), [
    (lambda payload, path: torch.save({"state_dict": payload}, path), "was refused: loading it would run code"),
    (lambda payload, path: path.write_bytes(pickle.dumps({"state_dict": payload}, protocol=2)),
     "was refused: loading it would run code"),
    # Newer pickle protocols stop the weights-only reader even earlier.
    (lambda payload, path: path.write_bytes(pickle.dumps({"state_dict": payload}, protocol=5)),
     "is corrupt or not a PyTorch checkpoint"),
], ids=["torch-zip", "raw-pickle", "raw-pickle-protocol-5"])
def test_an_untrusted_checkpoint_never_runs_code(save, message, tmp_path):
    marker = tmp_path / "pwned"
    run_folder = tmp_path / "lightning_logs" / "version_0"
    hostile = run_folder / "checkpoints" / "last.ckpt"
    hostile.parent.mkdir(parents=True)
    save(PicklePayload(marker), hostile)
    control = tmp_path / "control.ckpt"  # proof that the payload works when unpickled naively
    save(PicklePayload(tmp_path / "control-ran"), control)
    if zipfile.is_zipfile(control):
        torch.load(control, weights_only=False)
    else:
        pickle.loads(control.read_bytes())
    assert (tmp_path / "control-ran").exists()
    for path in (hostile, run_folder, tmp_path):  # the file, its run folder, their parent
        with pytest.raises(CheckpointError, match=f"last.ckpt {message}"):
            fewshot.load(path)
    assert not marker.exists()


def test_an_untrusted_run_config_never_runs_code(run, tmp_path):
    marker = tmp_path / "pwned"
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    hostile = f"model:\n  backbone: !!python/object/apply:os.system ['touch {marker}']\n"
    (copy / "config.yaml").write_text(hostile)
    with pytest.raises(CheckpointError, match="config.yaml is not a readable run configuration"):
        fewshot.load(copy)
    assert not marker.exists()


@pytest.mark.parametrize(("field", "value", "message"), [
    ("backbone", {"class_path": "os.system", "init_args": {"command": "touch pwned"}},
     "backbone 'os.system' is not one fewshot rebuilds from a file"),
    ("backbone", {"class_path": "fewshot.models.Conv4", "init_args": {
        "norm_layer": {"class_path": "builtins.eval"}}}, "norm_layer 'builtins.eval' is not one"),
    ("backbone", {"class_path": "fewshot.models.Conv4", "init_args": {"hidden_channels": {"x": 1}}},
     "setting 'hidden_channels' must be a number"),
    ("format_version", FORMAT_VERSION + 1, f"format_version {FORMAT_VERSION + 1}, but this fewshot"),
    ("format", "something-else", "is not a fewshot export"),
    ("hyper_parameters", {"ways": 3, "warp_drive": True}, "has no option\\(s\\) \\['warp_drive'\\]"),
    ("preprocessing", {"channels": 2, "image_size": 28}, "channels must be 1 or 3"),
])
def test_export_metadata_is_checked_and_never_imports_what_it_names(export, field, value, message):
    metadata = json.loads((export / "fewshot.json").read_text())
    metadata[field] = value
    (export / "fewshot.json").write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match=message):
        fewshot.load(export)
    assert not os.path.exists("pwned")


def test_damaged_exports_are_named(export):
    weights = export / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt: its SHA-256 differs"):
        fewshot.load(export)
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing or unreadable"):
        fewshot.load(export)
    (export / "fewshot.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="fewshot.json is not a readable fewshot export"):
        fewshot.load(export)


@pytest.mark.parametrize("content", [b"", b"hello, not a checkpoint", "truncated"])
def test_corrupt_checkpoints_are_named(run, tmp_path, content):
    if content == "truncated":
        whole = (run / "checkpoints" / "last.ckpt").read_bytes()
        content = whole[: len(whole) // 2]
    (tmp_path / "broken.ckpt").write_bytes(content)
    with pytest.raises(CheckpointError, match="broken.ckpt is corrupt or not a PyTorch checkpoint"):
        fewshot.load(tmp_path / "broken.ckpt")


def test_missing_and_mismatched_checkpoints_are_named(run, tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint .*nowhere.ckpt does not exist"):
        fewshot.load(tmp_path / "nowhere.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in .*empty"):
        fewshot.load(tmp_path / "empty")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="other.ckpt is not a Lightning checkpoint"):
        fewshot.load(tmp_path / "other.ckpt")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["model"]["backbone"]["init_args"]["hidden_channels"] = 16  # the weights have 8
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(CheckpointError, match="the weights do not fit the model described by its settings"):
        fewshot.load(copy)


def test_a_resnet12_model_round_trips_through_an_export(tmp_path):
    """Its channel widths are a list in the JSON; the backbone is rebuilt from the allow-list."""
    from fewshot.inference.export import build_meta_learner, make_metadata
    from fewshot.inference.images import Preprocessing
    from fewshot.models import ResNet12
    from fewshot.training.module import MetaLearner

    torch.manual_seed(0)
    learner = MetaLearner(ResNet12(3, (4, 8, 8, 16), image_size=16), ways=3, meta_sgd=True)
    backbone = {"class_path": "fewshot.models.ResNet12",
                "init_args": {"in_channels": 3, "channels": [4, 8, 8, 16], "image_size": 16}}
    metadata = make_metadata(backbone, dict(learner.hparams),
                             Preprocessing(image_size=16, channels=3), {})
    files = ModelFiles(metadata, learner.state_dict(), tmp_path)
    rebuilt = build_meta_learner(read_export(write_export(files, tmp_path / "export")))
    x = torch.rand(6, 3, 16, 16)
    torch.testing.assert_close(rebuilt(x), learner.eval()(x))
