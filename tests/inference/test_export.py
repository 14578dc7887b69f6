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
from fewshot.algorithms import MetaSGD
from fewshot.core.inner_optimizers import SGD
from fewshot.inference.checkpoints import read_model
from fewshot.inference.export import (
    FORMAT_VERSION,
    AdaptableModel,
    CheckpointError,
    ModelFiles,
    build_model,
    make_metadata,
    read_export,
    write_export,
)
from fewshot.inference.images import Preprocessing
from fewshot.models import BACKBONES, Conv4, FewShotClassifier, ResNet12, TransductiveBatchNorm2d
from fewshot.models.registry import NORM_LAYERS


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
    assert sorted(p.name for p in export.iterdir()) == ["README.md", "fewshot.json", "model.safetensors"]
    assert torch.equal(predictions_of(fewshot.load(export)), predictions_of(fewshot.load(run)))
    for path in (export / "fewshot.json", export / "model.safetensors"):  # either file will do
        assert torch.equal(predictions_of(fewshot.load(path)), predictions_of(fewshot.load(run)))


def test_export_metadata_holds_everything_needed_to_rebuild_the_model(run, export):
    metadata = json.loads((export / "fewshot.json").read_text())
    assert metadata["format"] == "fewshot-export" and metadata["format_version"] == FORMAT_VERSION
    # Whether it comes from the checkpoint or the run's config.yaml, the backbone is named by
    # one of the allow-listed spellings, with every argument the run chose.
    backbone = metadata["backbone"]
    assert BACKBONES[backbone["class_path"]] is Conv4
    assert {k: v for k, v in backbone["init_args"].items() if k != "norm_layer"} == {
        "hidden_channels": 8, "in_channels": 1, "image_size": 28}
    norm = backbone["init_args"]["norm_layer"]
    assert NORM_LAYERS[norm["class_path"]] is TransductiveBatchNorm2d
    assert norm.get("init_args", {}) in ({}, {"eps": 1e-5})
    assert "hyper_parameters" not in metadata and metadata["ways"] == TRAINED_WAYS
    assert metadata["algorithm"] == {"class_path": "fewshot.algorithms.maml.MAML", "init_args": {
        "inner_steps": 1, "inner_lr": 0.4, "eval_inner_steps": 2, "eval_inner_lr": None,
        "first_order": False, "learned_rates": "none", "inner_max_grad_norm": None,
        "zero_head": False}}
    assert metadata["inner_optimizer"] == {"class_path": "fewshot.core.inner_optimizers.sgd.SGD",
                                           "init_args": {}}
    assert metadata["preprocessing"] == {"channels": 1, "image_size": 28, "invert": True,
                                         "mean": [0.0], "std": [1.0], "resize": "squash"}
    assert metadata["source"]["checkpoint"].endswith(".ckpt") and metadata["source"]["dataset"] == "omniglot"
    weights = safetensors.torch.load_file(export / "model.safetensors")
    checkpoint = torch.load(next(run.glob("checkpoints/best*.ckpt")), weights_only=True)
    assert weights.keys() == checkpoint["state_dict"].keys()
    assert all(name.startswith("network.") for name in weights)  # MAML learns no rates


def test_a_mamlpp_model_exports_its_learned_rates_and_per_step_batch_norm(
        _shared_fake_root, tmp_path_factory, tmp_path):
    mamlpp = trained_once(_shared_fake_root, tmp_path_factory, mamlpp=True)
    learner = fewshot.load(mamlpp)
    exported = fewshot.load(learner.save(tmp_path / "export"))
    weights = safetensors.torch.load_file(tmp_path / "export" / "model.safetensors")
    rates = {name for name in weights if "inner_lrs" in name}
    assert rates and all(name.startswith("algorithm.inner_lrs.") for name in rates)
    assert "algorithm.inner_lrs.features-blocks-0-weight" in rates and "algorithm.inner_lrs.head-bias" in rates
    assert weights["network.features.blocks.1.running_mean"].shape == (2, 8)  # 1 train step + 1
    algorithm = exported.metadata["algorithm"]
    assert algorithm["class_path"] == "fewshot.algorithms.mamlpp.MAMLPlusPlus"
    assert algorithm["init_args"]["batch_norm"] == "per_step_running"
    assert algorithm["init_args"]["learned_rates"] == "per_tensor"
    assert learner.lr is None and exported.lr is None  # learned rates, not one number
    assert not learner.batch_dependent  # running statistics: every image on its own
    assert torch.equal(predictions_of(exported), predictions_of(learner))
    bare = tmp_path / "bare.ckpt"  # no config.yaml: the backbone is inferred from the weights
    shutil.copy(next(mamlpp.glob("checkpoints/best*.ckpt")), bare)
    assert torch.equal(predictions_of(fewshot.load(bare)), predictions_of(learner))


def test_tensors_beyond_the_network_survive_an_export(run, tmp_path):
    # Learned extras (e.g. MAML++ per-step learning rates) are simply more state_dict entries.
    model = read_model(run)
    extra = {**model.state_dict, "algorithm.inner_lrs.step_0": torch.tensor([0.1, 0.2])}
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
    ("algorithm", {"class_path": "os.system", "init_args": {"command": "touch pwned"}},
     "algorithm 'os.system' is not one fewshot knows"),
    ("algorithm", {"class_path": "fewshot.algorithms.maml.MAML", "init_args": {
        "inner_lr": {"class_path": "os.system", "init_args": {"command": "touch pwned"}}}},
     "cannot build algorithm fewshot.algorithms.maml.MAML"),
    ("algorithm", {"class_path": "fewshot.algorithms.maml.MAML", "init_args": {"warp_drive": True}},
     "unexpected keyword argument 'warp_drive'"),
    ("algorithm", {"class_path": "fewshot.algorithms.maml.MAML", "init_args": {"inner_steps": -1}},
     "inner_steps must be an integer >= 0, got -1"),
    ("algorithm", "fewshot.algorithms.maml.MAML", "\"algorithm\" must be an object"),
    ("inner_optimizer", {"class_path": "builtins.eval", "init_args": {}},
     "inner_optimizer 'builtins.eval' is not one fewshot knows"),
    ("inner_optimizer", None, "\"inner_optimizer\" must be an object"),
    ("ways", "3", "\"ways\" must be an integer, got '3'"),
    ("ways", True, "\"ways\" must be an integer, got True"),
    ("ways", 1, "a few-shot task needs at least 2 ways"),
    ("format_version", 0, "format_version must be a positive integer, got 0"),
    ("format_version", "2", "format_version must be a positive integer, got '2'"),
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
    for checkpoint_path in copy.glob("checkpoints/*.ckpt"):  # and wherever the backbone is recorded
        checkpoint = torch.load(checkpoint_path, weights_only=True)
        if isinstance(checkpoint["hyper_parameters"].get("backbone"), dict):
            checkpoint["hyper_parameters"]["backbone"]["init_args"]["hidden_channels"] = 16
            torch.save(checkpoint, checkpoint_path)
    with pytest.raises(CheckpointError, match="the weights do not fit the model described by its settings"):
        fewshot.load(copy)


def rewrite_weights(export, change) -> None:
    """Replace the export's weights by ``change(weights)``, keeping its checksum right."""
    weights = safetensors.torch.load_file(export / "model.safetensors")
    metadata = json.loads((export / "fewshot.json").read_text())
    metadata.pop("weights_sha256")
    write_export(ModelFiles(metadata, change(weights), export), export)


@pytest.mark.parametrize(("change", "message"), [
    # An export whose settings say one thing and whose weights another.
    (lambda w: {**w, "network.features.blocks.0.weight": torch.zeros(16, 1, 3, 3)},
     "size mismatch for network.features.blocks.0.weight"),
    (lambda w: {k: v for k, v in w.items() if k != "network.head.bias"}, "Missing key"),
    # Format 1's name for the learned rates is not read in a format-2 export.
    (lambda w: {**w, "inner_lrs.head-bias": torch.ones(1)}, "Unexpected key"),
    (lambda w: {**w, "algorithm.inner_lrs.head-bias": torch.ones(1)}, "Unexpected key"),
], ids=["wrong-shape", "missing", "format1-rate-name", "rate-of-maml-without-rates"])
def test_weights_that_do_not_fit_their_settings_are_refused(export, change, message):
    rewrite_weights(export, change)
    with pytest.raises(CheckpointError, match=f"the weights do not fit the model described by its settings.*{message}"):
        fewshot.load(export)


def test_an_export_with_a_different_head_size_than_its_ways_is_refused(export):
    metadata = json.loads((export / "fewshot.json").read_text())
    metadata["ways"] = TRAINED_WAYS + 1
    (export / "fewshot.json").write_text(json.dumps(metadata))
    with pytest.raises(CheckpointError, match="size mismatch for network.head.weight"):
        fewshot.load(export)


def test_a_resnet12_model_round_trips_through_an_export(tmp_path):
    """Its channel widths are a list in the JSON; the backbone is rebuilt from the allow-list."""
    torch.manual_seed(0)
    network = FewShotClassifier(ResNet12(3, (4, 8, 8, 16), image_size=16), ways=3)
    algorithm = MetaSGD(inner_lr=0.1)
    algorithm.build(network, SGD())
    model = AdaptableModel(network, algorithm).eval()
    with torch.no_grad():  # learned rates that differ by entry, so that a mix-up shows
        for rate in algorithm.inner_lrs.values():
            rate.uniform_(0.05, 0.15)
    backbone = {"class_path": "fewshot.models.ResNet12",
                "init_args": {"in_channels": 3, "channels": [4, 8, 8, 16], "image_size": 16}}
    metadata = make_metadata(backbone, 3, algorithm.settings(), SGD().settings(),
                             Preprocessing(image_size=16, channels=3), {})
    files = ModelFiles(metadata, model.state_dict(), tmp_path)
    rebuilt = build_model(read_export(write_export(files, tmp_path / "export")))
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    assert any(key.startswith("algorithm.inner_lrs.features-") for key in rebuilt.state_dict())
    x, y = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2] * 2)
    torch.testing.assert_close(rebuilt.network(x), model.network(x), rtol=0, atol=0)
    query = torch.rand(4, 3, 16, 16)
    expected = model.predict_logits(model.adapt(x, y), query)
    assert torch.equal(rebuilt.predict_logits(rebuilt.adapt(x, y), query), expected)
