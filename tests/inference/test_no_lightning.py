"""Using a trained model never imports Lightning or the training shell (fewshot.training).

The checks run in a fresh interpreter (this test process has imported Lightning already), one
for all of them since starting one costs seconds: each scenario runs in turn and records the
modules it added, and last the training shell is imported to show that the record sees it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tiny_exports import export_model, images, tiny_model
from tiny_runs import trained_once

from fewshot.algorithms import MAML, ProtoNet

SRC = Path(__file__).resolve().parents[2] / "src"
FORMAT1 = Path(__file__).resolve().parents[1] / "fixtures" / "format1"

DRIVER = """
import json, sys
scenarios = json.loads(sys.argv[1])
before, added = set(sys.modules), {}
for name, code in scenarios.items():
    exec(compile(code, name, "exec"), {})
    added[name] = sorted(set(sys.modules) - before)
    before = set(sys.modules)
print(json.dumps({"added": added, "all": sorted(sys.modules)}))
"""


def write_task(directory: Path) -> tuple[Path, Path]:
    """``support/class_i/*.png`` (3 classes, 2 shots) and ``query/*.png`` of random pixels."""
    for index, image in enumerate(images(6)):
        folder = directory / "support" / f"class_{index % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image[0] * 255).byte().numpy(), mode="L").save(folder / f"{index}.png")
    (directory / "query").mkdir()
    for index, image in enumerate(images(2, seed=1)):
        Image.fromarray((image[0] * 255).byte().numpy(), mode="L").save(directory / "query" / f"{index}.png")
    return directory / "support", directory / "query"


@pytest.fixture(scope="module")
def scenarios(_shared_fake_root, tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("no-lightning")
    exports = {}
    for algorithm in (MAML, ProtoNet):
        model, metadata = tiny_model(algorithm(), ways=3)
        exports[algorithm.__name__] = export_model(model, metadata, directory / algorithm.__name__)
    run = trained_once(_shared_fake_root, tmp_path_factory)
    support, query = write_task(directory / "task")
    adapt_predict = """
import torch
import fewshot
learner = fewshot.load({path!r})
support = torch.rand(6, 1, 28, 28)
predictions = learner.adapt(support, ["a", "b", "c"] * 2).predict(torch.rand(4, 1, 28, 28))
assert predictions.probabilities.shape == (4, 3)
predictions = learner.adapt(support[:4], [0, 1, 2, 3]).predict(torch.rand(2, 1, 28, 28))
assert predictions.probabilities.shape == (2, 4)
"""
    return {
        "MAML export": adapt_predict.format(path=str(exports["MAML"]))
        + f"learner.save({str(directory / 'saved')!r})\n",
        "ProtoNet export": adapt_predict.format(path=str(exports["ProtoNet"])),
        "format-1 export": adapt_predict.format(path=str(FORMAT1 / "mamlpp")),
        "Lightning run folder": adapt_predict.format(path=str(run)),
        "Lightning .ckpt": adapt_predict.format(path=str(run / "checkpoints" / "last.ckpt")),
        "fewshot adapt": f"""
from fewshot.cli import main
main(["adapt", "--checkpoint", {str(exports["MAML"])!r}, "--support", {str(support)!r},
      "--query", {str(query)!r}, "--output", {str(directory / "out.json")!r}])
""",
        "fewshot export": f"""
from fewshot.cli import main
main(["export", "--checkpoint", {str(run)!r}, "--output", {str(directory / "exported")!r}])
""",
        # Last: the control, proof that the record sees Lightning and the training shell.
        "training shell": "import fewshot.training.module\n",
    }


@pytest.fixture(scope="module")
def imported(scenarios, tmp_path_factory) -> dict:
    done = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(scenarios)],
                          cwd=tmp_path_factory.mktemp("fresh-interpreter"), capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def lightning(modules: list[str]) -> list[str]:
    return [m for m in modules if m.split(".")[0] in ("lightning", "pytorch_lightning", "lightning_fabric")]


def training(modules: list[str]) -> list[str]:
    return [m for m in modules if "fewshot.training" in m]


@pytest.mark.parametrize("scenario", ["MAML export", "ProtoNet export", "format-1 export",
                                      "Lightning run folder", "Lightning .ckpt", "fewshot adapt",
                                      "fewshot export"])
def test_using_a_trained_model_imports_no_lightning(imported, scenario):
    names = list(imported["added"])
    # Imports only accumulate: nothing up to and including this scenario brought them in.
    so_far = [m for name in names[: names.index(scenario) + 1] for m in imported["added"][name]]
    assert lightning(so_far) == [] and training(so_far) == []


def test_the_first_scenario_loaded_the_inference_layer(imported):
    first = imported["added"]["MAML export"]
    assert {"torch", "fewshot.inference.learner", "fewshot.inference.export"} <= set(first)
    assert "fewshot.inference.format1" in imported["all"]  # the format-1 export was upgraded
    assert "fewshot.inference.cli" in imported["added"]["fewshot adapt"]


def test_the_record_sees_lightning_when_the_training_shell_is_imported(imported):
    added = imported["added"]["training shell"]
    assert "lightning" in lightning(added) and "fewshot.training.module" in training(added)
    assert lightning(imported["all"]) and training(imported["all"])
