"""A ProtoNet export: loaded with fewshot.load, it classifies by distance to the prototypes of
the support embeddings, for any number of classes, from Python and from ``fewshot adapt``."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tiny_exports import export_model, images, tiny_model

import fewshot
from fewshot.algorithms import ProtoNet
from fewshot.cli import main

TRAINED_WAYS = 5  # ProtoNet has no use for its head: tasks of any N use the same model


@pytest.fixture
def protonet(tmp_path):
    model, metadata = tiny_model(ProtoNet(), ways=TRAINED_WAYS)
    return model, export_model(model, metadata, tmp_path / "protonet")


def logits_by_hand(features: torch.nn.Module, support: torch.Tensor, labels: list[int],
                   query: torch.Tensor) -> torch.Tensor:
    """``-||f(query) - mean of f(support of class c)||^2``, one class at a time."""
    with torch.no_grad():
        embedded_support, embedded_query = features(support), features(query)
        centres = torch.stack([embedded_support[torch.tensor(labels) == c].mean(dim=0)
                               for c in sorted(set(labels))])
        return torch.stack([-((embedded_query - centre) ** 2).sum(dim=1) for centre in centres], dim=1)


def test_a_protonet_export_predicts_the_prototype_logits_computed_by_hand(protonet):
    model, export = protonet
    learner = fewshot.load(export)
    assert learner.metadata["algorithm"] == {"class_path": "fewshot.algorithms.protonet.ProtoNet",
                                             "init_args": {}}
    assert learner.ways == TRAINED_WAYS and learner.steps == 0
    support, query = images(7), images(5, seed=1)
    names = ["cat", "dog", "cat", "bird", "dog", "bird", "bird"]  # 3 ways, 2/2/3 shots
    predictor = learner.adapt(support, names)
    assert predictor.classes == ["cat", "dog", "bird"] and not predictor.head_reset
    assert predictor.steps == 0 and predictor.adapted.steps_taken == 0
    indices = [predictor.classes.index(name) for name in names]
    expected = logits_by_hand(model.network.features, support, indices, query)
    assert predictor.adapted.extras["prototypes"].shape == (3, 8)
    logits = predictor.model.predict_logits(predictor.adapted, query)
    assert logits.shape == (5, 3)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    predictions = predictor.predict(query)
    torch.testing.assert_close(predictions.probabilities, expected.softmax(dim=1), rtol=1e-5, atol=1e-6)
    assert predictions.labels == [predictor.classes[i] for i in expected.argmax(dim=1).tolist()]
    # The query images are classified by what they look like, not by the head: a nonsense
    # head changes nothing.
    with torch.no_grad():
        predictor.model.network.head.weight.fill_(123.0)
    assert torch.equal(predictor.predict(query).probabilities, predictions.probabilities)


def test_protonet_equals_the_prototype_formula_in_float64(protonet):
    model, _ = protonet
    model = model.double()
    support, query = images(9, dtype=torch.float64), images(4, seed=1, dtype=torch.float64)
    labels = [2, 0, 1, 1, 0, 2, 2, 0, 1]
    adapted = model.adapt(support, torch.tensor(labels))
    expected = logits_by_hand(model.network.features, support, labels, query)
    torch.testing.assert_close(model.predict_logits(adapted, query), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("ways", [2, 3, 7])
def test_a_protonet_adapts_to_any_number_of_classes_without_a_new_head(protonet, ways):
    model, export = protonet
    learner = fewshot.load(export)
    labels = list(range(ways)) * 2
    predictor = learner.adapt(images(2 * ways), labels)
    assert not predictor.head_reset
    query = images(3, seed=2)
    expected = logits_by_hand(model.network.features, images(2 * ways), labels, query)
    torch.testing.assert_close(predictor.predict(query).probabilities, expected.softmax(dim=1),
                               rtol=1e-5, atol=1e-6)


def write_folders(directory, support: torch.Tensor, labels: list[str], query: torch.Tensor):
    """``support/<class>/<i>.png`` and ``query/<i>.png``: 8-bit grayscale images that the
    Omniglot preprocessing turns back into ``1 - pixel``."""
    def save(image: torch.Tensor, path) -> None:
        pixels = (255 - (image[0] * 255).round()).to(torch.uint8).numpy()
        Image.fromarray(pixels, mode="L").resize((28, 28)).save(path)

    for index, (image, label) in enumerate(zip(support, labels, strict=True)):
        (directory / "support" / label).mkdir(parents=True, exist_ok=True)
        save(image, directory / "support" / label / f"{index:02d}.png")
    (directory / "query").mkdir(parents=True)
    for index, image in enumerate(query):
        save(image, directory / "query" / f"{index:02d}.png")
    return directory / "support", directory / "query"


def test_fewshot_adapt_runs_a_protonet_export_like_the_api(protonet, tmp_path, capsys):
    model, export = protonet
    labels = ["alpha", "beta", "gamma"] * 2
    support_dir, query_dir = write_folders(tmp_path / "task", images(6), labels, images(4, seed=1))
    output = tmp_path / "out.json"
    main(["adapt", "--checkpoint", str(export), "--support", str(support_dir), "--query",
          str(query_dir), "--output", str(output)])
    result = json.loads(output.read_text())
    assert result["classes"] == ["alpha", "beta", "gamma"] and result["steps"] == 0
    assert result["support"] == {"alpha": 2, "beta": 2, "gamma": 2}
    assert result["trained_ways"] == TRAINED_WAYS
    printed = capsys.readouterr().out
    assert "0 step(s), learning rate none (no inner loop)" in printed
    # The same images through the Python API, and the prototype formula by hand.
    learner = fewshot.load(export)
    support = sorted(support_dir.glob("*/*.png"))
    queries = sorted(query_dir.glob("*.png"))
    expected = learner.adapt(support, [p.parent.name for p in support]).predict(queries)
    assert [r["image"] for r in result["predictions"]] == expected.images
    assert [r["prediction"] for r in result["predictions"]] == expected.labels
    assert [list(r["probabilities"].values()) for r in result["predictions"]] == expected.probabilities.tolist()
    x_support, _ = learner.preprocessing.prepare(support)
    x_query, _ = learner.preprocessing.prepare(queries)
    indices = [["alpha", "beta", "gamma"].index(p.parent.name) for p in support]
    by_hand = logits_by_hand(model.network.features, x_support, indices, x_query).softmax(dim=1)
    torch.testing.assert_close(expected.probabilities, by_hand, rtol=1e-5, atol=1e-6)


def test_fewshot_export_of_a_protonet_export_is_the_same_model(protonet, tmp_path, capsys):
    _, export = protonet
    main(["export", "--checkpoint", str(export), "--output", str(tmp_path / "again")])
    assert "Exported" in capsys.readouterr().out
    for name in ("fewshot.json", "model.safetensors"):
        assert (export / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
