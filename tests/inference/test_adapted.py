"""The adapted-classifier file: saved from Python or ``fewshot adapt --save``, read back by
``fewshot.load`` and ``fewshot predict`` with bit-identical predictions; damaged, foreign or
newer files are refused by name."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_exports import export_model, images, tiny_model

import fewshot
from fewshot.algorithms import MAML, MAMLPlusPlus, MetaSGD, ProtoNet
from fewshot.cli import main
from fewshot.inference.adapted import ADAPTED_FILE, FORMAT_VERSION
from fewshot.inference.export import CheckpointError
from fewshot.inference.learner import Learner, Predictor

CASES = [("maml", lambda: MAML(inner_steps=2, inner_lr=0.3, eval_inner_steps=3)),
         ("mamlpp", lambda: MAMLPlusPlus(inner_steps=2, inner_lr=0.2)),
         ("meta-sgd", lambda: MetaSGD(inner_steps=2, inner_lr=0.2)),
         ("protonet", ProtoNet)]


@pytest.mark.parametrize("ways", [3, 4], ids=["trained-head", "zero-head"])
@pytest.mark.parametrize("make_algorithm", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_a_saved_classifier_predicts_bit_for_bit_as_before(make_algorithm, ways, tmp_path):
    model, metadata = tiny_model(make_algorithm(), ways=3)
    learner = fewshot.load(export_model(model, metadata, tmp_path / "export"))
    labels = ["cat", "dog", "emu", "fox"][:ways] * 2
    predictor = learner.adapt(images(len(labels)), labels)
    query = images(5, seed=1)
    for path in (tmp_path / "folder", tmp_path / "one.safetensors"):
        written = predictor.save(path)
        assert written == (path / ADAPTED_FILE if path.suffix == "" else path)
        loaded = fewshot.load(path)
        assert isinstance(loaded, Predictor) and loaded.classes == labels[:ways]
        assert loaded.support_labels == labels and loaded.steps == predictor.steps
        assert loaded.head_reset == predictor.head_reset == (ways != 3 and not isinstance(
            model.algorithm, ProtoNet))
        for one_at_a_time in (False, True):
            assert torch.equal(loaded.predict(query, one_at_a_time).probabilities,
                               predictor.predict(query, one_at_a_time).probabilities)
    assert "cat (2 images)" in (tmp_path / "folder" / "README.md").read_text()
    # It saves again from what it read, unchanged.
    again = fewshot.load(tmp_path / "one.safetensors").save(tmp_path / "two.safetensors")
    assert torch.equal(fewshot.load(again).predict(query).probabilities,
                       predictor.predict(query).probabilities)


def write_task(folder, rng) -> tuple:
    for split, count in (("support", 2), ("query", 3)):
        for name in ("alpha", "beta", "gamma"):
            (folder / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = (rng.random((28, 28)) > 0.7).astype(np.uint8) * 255
                Image.fromarray(pixels).save(folder / split / name / f"{i}.png")
    return folder / "support", folder / "query"


def test_fewshot_adapt_save_then_predict_gives_the_same_output(tmp_path, capsys):
    model, metadata = tiny_model(MAML(inner_steps=1, inner_lr=0.3, eval_inner_steps=2), ways=3)
    export = export_model(model, metadata, tmp_path / "export")
    support, query = write_task(tmp_path / "task", np.random.default_rng(0))
    main(["adapt", "--checkpoint", str(export), "--support", str(support), "--query", str(query),
          "--output", str(tmp_path / "adapt.json"), "--save", str(tmp_path / "saved")])
    assert "Saved the adapted classifier to" in capsys.readouterr().out
    main(["predict", "--checkpoint", str(tmp_path / "saved"), "--query", str(query),
          "--output", str(tmp_path / "predict.json")])
    adapted, predicted = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("adapt", "predict"))
    assert predicted["predictions"] == adapted["predictions"]
    assert predicted["support"] == adapted["support"] == {"alpha": 2, "beta": 2, "gamma": 2}
    assert predicted["trained_ways"] == 3
    # From Python, the same.
    loaded = fewshot.load(tmp_path / "saved")
    assert loaded.predict(sorted(query.glob("*/*.png"))).labels == [
        r["prediction"] for r in adapted["predictions"]]
    # A classifier takes no support set; a model needs one.
    for extra, culprit in (["--support", str(support)], "it takes no --support"), (
            ["--steps", "2"], "it takes no --steps"):
        with pytest.raises(SystemExit):
            main(["predict", "--checkpoint", str(tmp_path / "saved"), "--query", str(query), *extra])
        assert culprit in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "--checkpoint", str(export), "--query", str(query)])
    assert "--support is required to adapt" in capsys.readouterr().err


@pytest.fixture
def saved(tmp_path):
    model, metadata = tiny_model(MAML(inner_steps=1, inner_lr=0.3), ways=3)
    learner = fewshot.load(export_model(model, metadata, tmp_path / "export"))
    return learner.adapt(images(3), ["a", "b", "c"]).save(tmp_path / "c.safetensors")


def test_a_damaged_file_is_refused_by_name(saved):
    data = bytearray(saved.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the tensors
    saved.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"c.safetensors is corrupt: its tensors' SHA-256"):
        fewshot.load(saved)
    saved.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="c.safetensors is not a readable safetensors file"):
        fewshot.load(saved)


def test_a_foreign_or_newer_file_is_refused_by_name(saved, tmp_path):
    export_weights = tmp_path / "export" / "model.safetensors"
    renamed = tmp_path / "weights.safetensors"
    renamed.write_bytes(export_weights.read_bytes())
    with pytest.raises(CheckpointError, match="weights.safetensors is not a fewshot adapted classifier"):
        fewshot.load(renamed)
    data = saved.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    header["__metadata__"]["format_version"] = str(FORMAT_VERSION + 1)
    text = json.dumps(header).encode()
    saved.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
    with pytest.raises(CheckpointError, match="reads up to 1: upgrade fewshot"):
        fewshot.load(saved)
    # An export is still a model to adapt, not a classifier.
    assert isinstance(fewshot.load(tmp_path / "export"), Learner)


def test_classes_that_json_cannot_hold_are_refused_on_save(tmp_path):
    model, metadata = tiny_model(MAML(inner_steps=1, inner_lr=0.3), ways=3)
    learner = fewshot.load(export_model(model, metadata, tmp_path / "export"))
    predictor = learner.adapt(images(3), [("a",), ("b",), ("c",)])
    with pytest.raises(ValueError, match=r"class \('a',\) cannot be saved"):
        predictor.save(tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()
