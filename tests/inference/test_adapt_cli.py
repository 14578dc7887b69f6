"""``fewshot adapt`` / ``fewshot export``: same predictions as the API, one-line user errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_runs import TRAINED_WAYS, trained_once, write_task

import fewshot
from fewshot.cli import main

FORMAT1 = Path(__file__).resolve().parents[1] / "fixtures" / "format1"


@pytest.fixture(scope="session")
def run(_shared_fake_root, tmp_path_factory):
    return trained_once(_shared_fake_root, tmp_path_factory)


@pytest.fixture
def task(fake_omniglot, tmp_path):
    return write_task(fake_omniglot[0], tmp_path / "task", ways=TRAINED_WAYS, shots=2)


def adapt(*args) -> None:
    main(["adapt", *map(str, args)])


def api_predictions(checkpoint, support_dir, queries, **options):
    support = sorted(p for folder in sorted(support_dir.iterdir()) for p in sorted(folder.iterdir()))
    predictor = fewshot.load(checkpoint).adapt(support, [p.parent.name for p in support],
                                               steps=options.pop("steps", None))
    return predictor.predict(queries, **options)


def test_cli_and_api_give_identical_predictions(run, task, tmp_path, capsys):
    support, query = task
    output = tmp_path / "out.json"
    adapt("--checkpoint", run, "--support", support, "--query", query, "--output", output)
    result = json.loads(output.read_text())
    expected = api_predictions(run, support, sorted(query.glob("*.png")))
    assert result["classes"] == expected.classes == ["class_0", "class_1", "class_2"]
    assert [r["image"] for r in result["predictions"]] == expected.images
    assert [r["prediction"] for r in result["predictions"]] == expected.labels
    assert [list(r["probabilities"].values()) for r in result["predictions"]] == expected.probabilities.tolist()
    assert result["support"] == {"class_0": 2, "class_1": 2, "class_2": 2}
    assert result["steps"] == 2 and result["head"] == "trained" and "transductive" in result["batching"]
    printed = capsys.readouterr().out
    assert "Support: 3 classes, 6 images: class_0 (2), class_1 (2), class_2 (2)" in printed
    assert "normalised together as one batch" in printed
    assert all(p.name in printed for p in query.glob("*.png")) and "top 3" in printed


def test_one_at_a_time_csv_output_matches_the_api(run, task, tmp_path):
    support, query = task
    output = tmp_path / "out.csv"
    adapt("--checkpoint", run, "--support", support, "--query", *sorted(query.glob("*.png"))[:3],
          "--one-at-a-time", "--steps", 3, "--top-k", 2, "--output", output)
    with output.open() as file:
        rows = list(csv.DictReader(file))
    expected = api_predictions(run, support, sorted(query.glob("*.png"))[:3], one_at_a_time=True, steps=3)
    assert [row["prediction"] for row in rows] == expected.labels
    for row, probabilities in zip(rows, expected.probabilities.tolist(), strict=True):
        assert [float(row[f"p({c})"]) for c in expected.classes] == probabilities
        assert row["top_k"].count(";") == 1


def test_an_export_adapts_exactly_like_its_checkpoint(run, task, tmp_path, capsys):
    support, query = task
    main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "model")])
    assert "Exported" in capsys.readouterr().out
    metadata = json.loads((tmp_path / "model" / "fewshot.json").read_text())
    assert metadata["format_version"] == 2 and metadata["ways"] == TRAINED_WAYS
    assert metadata["algorithm"]["class_path"] == "fewshot.algorithms.maml.MAML"
    outputs = {}
    for name, checkpoint in (("ckpt", run), ("export", tmp_path / "model")):
        outputs[name] = tmp_path / f"{name}.json"
        adapt("--checkpoint", checkpoint, "--support", support, "--query", query, "--output", outputs[name])
    first, second = (json.loads(outputs[n].read_text())["predictions"] for n in ("ckpt", "export"))
    assert first == second


def test_a_format1_export_adapts_and_is_exported_as_format2(task, tmp_path, capsys):
    support, query = task
    adapt("--checkpoint", FORMAT1 / "anil_meta_sgd", "--support", support, "--query", query,
          "--output", tmp_path / "old.json")
    assert "learning rate learned per step" in capsys.readouterr().out  # Meta-SGD rates
    main(["export", "--checkpoint", str(FORMAT1 / "anil_meta_sgd"), "--output", str(tmp_path / "new")])
    metadata = json.loads((tmp_path / "new" / "fewshot.json").read_text())
    assert metadata["format_version"] == 2 and metadata["upgraded_from_format"] == 1
    assert metadata["algorithm"]["class_path"] == "fewshot.algorithms.anil.ANIL"
    assert metadata["inner_optimizer"]["class_path"] == "fewshot.core.inner_optimizers.adam.Adam"
    adapt("--checkpoint", tmp_path / "new", "--support", support, "--query", query,
          "--output", tmp_path / "new.json")
    old, new = (json.loads((tmp_path / f"{n}.json").read_text())["predictions"] for n in ("old", "new"))
    assert old == new


def test_more_classes_than_the_head_and_unequal_shots_work(run, fake_omniglot, tmp_path, capsys):
    support, query = write_task(fake_omniglot[0], tmp_path / "task", ways=5, shots=[1, 2, 3, 1, 4])
    adapt("--checkpoint", run, "--support", support, "--query", query, "--output", tmp_path / "out.json")
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["head"] == "zero-initialised" and len(result["classes"]) == 5
    assert result["support"] == {f"class_{i}": k for i, k in enumerate([1, 2, 3, 1, 4])}
    assert "a zero-initialised 5-way head (trained for 3)" in capsys.readouterr().out


def test_images_are_converted_and_resized_when_safe(run, task, tmp_path):
    support, query = task
    image = next((support / "class_0").iterdir())
    Image.open(image).convert("RGB").resize((60, 60)).save(support / "class_0" / "colour.jpg")
    adapt("--checkpoint", run, "--support", support, "--query", query, "--output", tmp_path / "o.json")
    assert json.loads((tmp_path / "o.json").read_text())["support"]["class_0"] == 3


def expect_user_error(capsys, *args, culprit: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fewshot: error:") and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert culprit in err, err


def test_support_folder_errors_name_the_culprit(run, task, capsys):
    support, query = task
    common = ("adapt", "--checkpoint", run, "--query", query, "--support")
    expect_user_error(capsys, *common, support / "nowhere", culprit="support folder")
    for folder in ("class_1", "class_2"):
        shutil.rmtree(support / folder)
    expect_user_error(capsys, *common, support, culprit="only 'class_0'")
    (support / "class_9").mkdir()
    (support / "class_9" / "notes.txt").write_text("no images here")
    expect_user_error(capsys, *common, support, culprit="class 'class_9'")
    shutil.copy(next((support / "class_0").iterdir()), support / "loose.png")
    expect_user_error(capsys, *common, support, culprit="loose.png")


def test_query_and_image_errors_name_the_culprit(run, task, capsys):
    support, query = task
    common = ("adapt", "--checkpoint", run, "--support", support, "--query")
    expect_user_error(capsys, *common, query / "missing.png", culprit="missing.png does not exist")
    (query / "empty").mkdir()
    expect_user_error(capsys, *common, query / "empty", culprit="query folder")
    (query / "wide.png").write_bytes(b"garbage")
    expect_user_error(capsys, *common, query, culprit="wide.png is not a readable image")


def test_checkpoint_errors_name_the_culprit(run, task, tmp_path, capsys):
    support, query = task
    common = ("--support", support, "--query", query)
    expect_user_error(capsys, "adapt", "--checkpoint", tmp_path / "gone.ckpt", *common,
                      culprit="gone.ckpt does not exist")
    (tmp_path / "bad.ckpt").write_bytes(b"\x00" * 64)
    expect_user_error(capsys, "adapt", "--checkpoint", tmp_path / "bad.ckpt", *common,
                      culprit="bad.ckpt is corrupt")
    expect_user_error(capsys, "export", "--checkpoint", tmp_path / "bad.ckpt", "--output",
                      tmp_path / "out", culprit="bad.ckpt is corrupt")


def test_a_hostile_checkpoint_is_refused_by_the_cli_without_running(task, tmp_path, capsys):
    support, query = task
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": Payload()}, tmp_path / "shared.ckpt")
    expect_user_error(capsys, "adapt", "--checkpoint", tmp_path / "shared.ckpt", "--support",
                      support, "--query", query, culprit="shared.ckpt was refused")
    expect_user_error(capsys, "export", "--checkpoint", tmp_path / "shared.ckpt", "--output",
                      tmp_path / "out", culprit="shared.ckpt was refused")
    assert not marker.exists()


def test_bad_options_are_usage_errors(run, task, capsys):
    support, query = task
    with pytest.raises(SystemExit) as exit_info:
        adapt("--checkpoint", run, "--support", support, "--query", query, "--output", "out.txt")
    assert exit_info.value.code == 2 and "must end in .csv or .json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        adapt("--checkpoint", run, "--support", support, "--query", query, "--device", "toaster")
    assert exit_info.value.code == 2 and "'toaster' is not a torch device" in capsys.readouterr().err
    expect_user_error(capsys, "adapt", "--checkpoint", run, "--support", support, "--query", query,
                      "--steps", -2, culprit="steps must be an integer >= 0, got -2")


def test_predict_is_adapt(run, task, tmp_path):
    """`fewshot predict` does what its name says: the same predictions as `fewshot adapt`."""
    support, query = task
    adapt("--checkpoint", run, "--support", support, "--query", query, "--output",
          tmp_path / "adapt.json")
    main(["predict", "--checkpoint", str(run), "--support", str(support), "--query", str(query),
          "--output", str(tmp_path / "predict.json")])
    assert json.loads((tmp_path / "predict.json").read_text()) == json.loads(
        (tmp_path / "adapt.json").read_text())
    from fewshot.training.cli import FewShotCLI

    assert "predict" not in FewShotCLI.subcommands()  # Lightning's, which cannot run here
