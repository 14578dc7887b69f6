"""The Python API: fewshot.load -> Learner.adapt -> Predictor.predict, on the model's own loop."""

from __future__ import annotations

import io
import random
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_runs import TRAINED_WAYS, trained_once, write_task
from torch import nn

import fewshot
import fewshot.cli
from fewshot.algorithms import MAML, Adapted
from fewshot.core.inner_optimizers import SGD
from fewshot.data.omniglot import Omniglot
from fewshot.inference.export import AdaptableModel, ModelFiles, make_metadata
from fewshot.inference.images import ImageError, Preprocessing
from fewshot.inference.learner import Learner
from fewshot.models import Conv4, FewShotClassifier

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def run(_shared_fake_root, tmp_path_factory):
    return trained_once(_shared_fake_root, tmp_path_factory)


@pytest.fixture(scope="session")
def learner(run):
    return fewshot.load(run)


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def test_predictions_are_the_models_own_adapt_and_predict(learner):
    support, query = images(6), images(5, seed=1)
    labels = ["b", "a", "c", "b", "a", "c"]
    predictor = learner.adapt(support, labels)
    predictions = predictor.predict(query)
    assert predictions.classes == ["b", "a", "c"]  # order of first appearance
    assert not predictor.head_reset and predictor.steps == 2 == learner.steps
    model = learner._meta_learner(TRAINED_WAYS, reset_head=False)
    adapted = model.adapt(support, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert isinstance(predictor.adapted, Adapted) and predictor.adapted.steps_taken == 2
    assert predictor.adapted.params.keys() == adapted.params.keys()
    assert all(torch.equal(predictor.adapted.params[n], p) for n, p in adapted.params.items())
    expected = model.predict_logits(adapted, query).softmax(dim=1)
    assert torch.equal(predictions.probabilities, expected)
    assert predictions.labels == [predictions.classes[i] for i in expected.argmax(1).tolist()]
    assert predictions.confidences == expected.max(1).values.tolist()
    assert torch.allclose(predictions.probabilities.sum(1), torch.ones(5))
    top = predictions.top_k(2)
    assert len(top) == 5 and all(len(row) == 2 and row[0][1] >= row[1][1] for row in top)
    assert top[0][0] == (predictions.labels[0], predictions.confidences[0])


def test_steps_and_lr_override_the_trained_inner_loop(learner):
    support, query = images(6), images(4, seed=1)
    unadapted = learner.adapt(support, [0, 1, 2] * 2, steps=0).predict(query).probabilities
    network = learner._meta_learner(TRAINED_WAYS, False).network
    assert torch.equal(unadapted, network(query).softmax(1))
    assert torch.equal(learner.adapt(support, [0, 1, 2] * 2, lr=0.0).predict(query).probabilities, unadapted)
    assert not torch.equal(learner.adapt(support, [0, 1, 2] * 2, steps=5).predict(query).probabilities, unadapted)


@pytest.mark.parametrize("ways", [2, 5, 7])
def test_any_number_of_classes_adapts_a_zero_initialised_head(learner, ways):
    labels = [f"class {i}" for i in range(ways)] * 2
    predictor = learner.adapt(images(2 * ways), labels)
    assert predictor.head_reset
    fresh = learner._meta_learner(ways, reset_head=True)
    assert fresh.network.head.out_features == ways
    assert not fresh.network.head.weight.any() and not fresh.network.head.bias.any()
    trained_features = learner._meta_learner(TRAINED_WAYS, False).network.features.state_dict()
    assert all(torch.equal(v, fresh.network.features.state_dict()[k]) for k, v in trained_features.items())
    predictions = predictor.predict(images(4, seed=1))
    assert predictions.probabilities.shape == (4, ways)
    assert not torch.allclose(predictions.probabilities, torch.full((4, ways), 1 / ways))


def test_the_trained_ways_can_also_start_from_a_zero_head(learner):
    assert learner.adapt(images(6), [0, 1, 2] * 2, reset_head=True).head_reset
    with pytest.raises(ValueError, match="head was trained for 3 ways; 4 ways need reset_head=True"):
        learner.adapt(images(8), [0, 1, 2, 3] * 2, reset_head=False)
    with pytest.raises(ValueError, match="zero-initialised head predicts nothing without adaptation"):
        learner.adapt(images(8), [0, 1, 2, 3] * 2, steps=0)


def test_classes_may_have_different_numbers_of_images(learner):
    labels = ["one"] + ["two"] * 2 + ["four"] * 4
    predictions = learner.adapt(images(7), labels).predict(images(3, seed=1))
    assert predictions.classes == ["one", "two", "four"] and len(predictions) == 3


def test_labels_may_be_any_hashable(learner):
    labels = [("x", 1), 7, None] * 2
    assert learner.adapt(images(6), labels).predict(images(2)).classes == [("x", 1), 7, None]


def test_paths_pil_images_and_tensors_give_the_same_predictions(learner, fake_omniglot, tmp_path):
    support_dir, query_dir = write_task(fake_omniglot[0], tmp_path, ways=3, shots=2)
    support = sorted(support_dir.glob("*/*.png"))
    labels = [p.parent.name for p in support]
    queries = sorted(query_dir.glob("*.png"))
    from_paths = learner.adapt(support, labels).predict(queries)
    pil = [Image.open(p) for p in support]
    from_pil = learner.adapt(pil, labels).predict([Image.open(p) for p in queries])
    tensors = learner.preprocessing.prepare(support)[0]
    from_tensors = learner.adapt(tensors, labels).predict(learner.preprocessing.prepare(queries)[0])
    assert from_paths.images == [str(p) for p in queries]
    assert torch.equal(from_paths.probabilities, from_pil.probabilities)
    assert torch.equal(from_paths.probabilities, from_tensors.probabilities)


def test_transductive_batches_are_reported_and_one_at_a_time_is_independent(learner):
    predictor = learner.adapt(images(6), [0, 1, 2] * 2)
    query = images(5, seed=1)
    together = predictor.predict(query)
    assert learner.batch_dependent
    assert "the 5 image(s) were normalised together as one batch" in together.batching
    assert not torch.allclose(predictor.predict(query[:2]).probabilities, together.probabilities[:2])
    alone = predictor.predict(query, one_at_a_time=True)
    assert "normalised together with the 6 support images" in alone.batching
    first = predictor.predict(query[:1], one_at_a_time=True).probabilities
    assert torch.allclose(alone.probabilities[:1], first, atol=1e-6)
    batch = torch.cat([predictor.support_x, query[3:4]])
    expected = predictor.model.predict_logits(predictor.adapted, batch)[-1].softmax(0)
    assert torch.allclose(alone.probabilities[3], expected, atol=1e-6)


def test_running_statistics_make_every_prediction_independent():
    torch.manual_seed(0)
    network = FewShotClassifier(Conv4(1, 8, 28, norm_layer=nn.BatchNorm2d), ways=3)
    algorithm = MAML()
    algorithm.build(network)
    with torch.no_grad():  # running statistics other than the initial ones
        network.train()(torch.rand(16, 1, 28, 28))
    model = AdaptableModel(network, algorithm)
    backbone = {"class_path": "fewshot.models.Conv4", "init_args": {
        "in_channels": 1, "hidden_channels": 8, "image_size": 28,
        "norm_layer": {"class_path": "torch.nn.BatchNorm2d"}}}
    metadata = make_metadata(backbone, 3, algorithm.settings(), SGD().settings(),
                             Preprocessing(1, 28, invert=True), {})
    learner = Learner(ModelFiles(metadata, model.state_dict(), Path("in-memory")))
    assert not learner.batch_dependent
    predictor = learner.adapt(images(6), [0, 1, 2] * 2)
    query = images(4, seed=1)
    predictions = predictor.predict(query)
    assert "every image is predicted independently" in predictions.batching
    assert torch.allclose(predictor.predict(query[:1]).probabilities, predictions.probabilities[:1], atol=1e-6)


def test_mamlpp_models_adapt_with_their_learned_rates_and_per_step_batch_norm(
        _shared_fake_root, tmp_path_factory):
    learner = fewshot.load(trained_once(_shared_fake_root, tmp_path_factory, mamlpp=True))
    support, query = images(6), images(4, seed=1)
    model = learner._meta_learner(TRAINED_WAYS, reset_head=False)
    for steps in (None, 1, 4):  # as evaluated, fewer, more than the trained slots
        predictor = learner.adapt(support, [0, 1, 2] * 2, steps=steps)
        adapted = model.adapt(support, torch.tensor([0, 1, 2] * 2), steps=steps)
        taken = learner.steps if steps is None else steps
        assert adapted.steps_taken == taken == predictor.adapted.steps_taken
        expected = model.predict_logits(adapted, query).softmax(1)
        assert predictor.lr is None and predictor.steps == taken
        assert torch.equal(predictor.predict(query).probabilities, expected)
    five_way = learner.adapt(images(10), list(range(5)) * 2).predict(query)
    assert five_way.probabilities.shape == (4, 5) and "independently" in five_way.batching


@pytest.mark.parametrize(("labels", "count", "message"), [
    (["a"] * 4, 4, "needs at least 2 classes; all 4 support images are labelled 'a'"),
    (["a", "b"], 3, "3 support images but 2 labels"),
    ([["a"], "b"], 2, "label 0 \\(\\['a'\\], of image\\[0\\]\\) is not hashable"),
])
def test_bad_support_sets_are_refused_by_name(learner, labels, count, message):
    with pytest.raises(ImageError, match=message):
        learner.adapt(images(count), labels)


@pytest.mark.parametrize(("option", "message"), [
    ({"steps": -1}, "steps must be an integer >= 0, got -1"),
    ({"steps": 1.5}, "steps must be an integer >= 0, got 1.5"),
    ({"lr": -0.1}, "lr must be a number >= 0, got -0.1"),
])
def test_bad_inner_loop_settings_are_named(learner, option, message):
    with pytest.raises(ValueError, match=message):
        learner.adapt(images(6), [0, 1, 2] * 2, **option)


def test_the_documented_example_runs(run, fake_omniglot, tmp_path, monkeypatch):
    """The README's adapt example, executed as written in a folder laid out as it says."""
    text = (REPO / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
              if "fewshot.load(" in b]
    assert len(blocks) == 1
    shutil.copytree(run, tmp_path / "runs" / "lightning_logs" / "version_0")
    write_task(fake_omniglot[0], tmp_path / "my_task", ways=3, shots=[2, 3, 1])
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert len(namespace["predictions"]) == 6


REAL_ROOT = REPO.parent / "shared" / "data" / "omniglot"


@pytest.mark.slow
@pytest.mark.real_data
def test_a_model_trained_briefly_on_real_background_characters_learns_new_ones(tmp_path):
    """Meta-train 60 steps on Omniglot's background alphabets, adapt on evaluation characters.

    The evaluation images go in as the raw PNGs a user would have (dark strokes on white),
    so this also checks that user images are prepared like the training data.
    """
    if not (REAL_ROOT / "images_background.zip").is_file():
        pytest.skip(f"real Omniglot not found in {REAL_ROOT}")
    with zipfile.ZipFile(REAL_ROOT / "images_evaluation.zip") as archive:
        members: dict[str, list[str]] = {}
        for name in sorted(archive.namelist()):
            if name.endswith(".png"):
                members.setdefault(name.rsplit("/", 1)[0].split("/", 1)[1], []).append(name)
        episodes = []
        rng = random.Random(0)
        for _ in range(20):  # 5-way 1-shot, 5 queries per class
            characters = rng.sample(sorted(members), 5)
            task = [(c, [Image.open(io.BytesIO(archive.read(m))) for m in rng.sample(members[c], 6)])
                    for c in characters]
            episodes.append(task)
    background = Omniglot(REAL_ROOT, split="train", class_split="lake", cache_dir=tmp_path / "cache")
    split = tmp_path / "split"
    split.mkdir()
    (split / "train.txt").write_text("\n".join(background.characters))
    evaluation = sorted(members)
    (split / "val.txt").write_text("\n".join(evaluation[:5]))  # required by fit, never used
    (split / "test.txt").write_text("\n".join(evaluation[5:]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread is fastest for this small model, and robust to a busy CPU
    try:
        fewshot.cli.main([
            "fit", f"--data.root={REAL_ROOT}", f"--data.cache_dir={tmp_path / 'cache'}",
            f"--data.class_split={split}", "--data.ways=5", "--data.shots=1", "--data.queries=1",
            "--data.meta_batch_size=8", "--data.val_episodes=1", "--trainer.limit_val_batches=0",
            "--trainer.max_steps=60", "--model.backbone.hidden_channels=32",
            "--model.optimizer.init_args.lr=0.005", "--model.algorithm.init_args.eval_inner_steps=3", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false"])
        learner = fewshot.load(tmp_path)
        correct = {"together": 0, "one at a time": 0}
        for task in episodes:
            predictor = learner.adapt([images[0] for _, images in task], [c for c, _ in task])
            queries = [image for _, images in task for image in images[1:]]
            truth = [c for c, images in task for _ in images[1:]]
            for mode in correct:
                labels = predictor.predict(queries, one_at_a_time=mode != "together").labels
                correct[mode] += sum(p == t for p, t in zip(labels, truth, strict=True))
    finally:
        torch.set_num_threads(threads)
    accuracy = {mode: count / (20 * 25) for mode, count in correct.items()}
    # Chance is 20%; 60 meta-steps reach about 64% (500 predictions: one standard error ~2%).
    assert accuracy["together"] > 0.45, accuracy
    assert accuracy["one at a time"] > 0.45, accuracy
