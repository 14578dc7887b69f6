"""The built wheel, installed into a fresh environment: configs by name from any folder, the
LICENSE, the pretrained model's files."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the ``bin`` folder of a new venv holding it; dependencies come from the
    environment running the tests, through --system-site-packages)."""
    folder = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(folder), str(REPO)], check=True)
    (wheel,) = folder.glob("fewshot-*.whl")
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                    str(wheel)], check=True)
    return wheel, venv / "bin"


def run(bin_folder: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(bin_folder / args[0]), *args[1:]], capture_output=True, text=True,
                          cwd=cwd, env=environment, timeout=300)


def test_the_wheel_holds_configs_license_and_no_repository_paths(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "fewshot/configs/omniglot_5way_1shot_cpu.yaml" in names
    assert "fewshot/configs/sweeps/wandb_sweep.yaml" in names
    assert any(name.endswith("licenses/LICENSE") for name in names)
    for part in ("model.safetensors", "fewshot.json", "README.md"):
        assert f"fewshot/pretrained/omniglot-5way-1shot/{part}" in names
    for part in ("index.html", "app.js", "app.css"):  # the page of fewshot app
        assert f"fewshot/app/static/{part}" in names


def test_the_shipped_model_loads_by_name_after_installing(installed, tmp_path):
    _, bin_folder = installed
    loaded = run(bin_folder, tmp_path, "python", "-c",
                 "import fewshot; learner = fewshot.load('omniglot-5way-1shot'); "
                 "print(learner.model_files.source)")
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert str(bin_folder.parent) in loaded.stdout  # read from the installed package


def test_a_config_runs_by_name_from_any_folder(installed, tmp_path):
    _, bin_folder = installed
    where = run(bin_folder, tmp_path, "python", "-c", "import fewshot; print(fewshot.__file__)")
    assert str(bin_folder.parent) in where.stdout, where.stdout + where.stderr  # the wheel's copy
    listed = run(bin_folder, tmp_path, "fewshot", "configs")
    assert listed.returncode == 0 and "omniglot_5way_1shot_cpu" in listed.stdout
    # The shipped Omniglot config, pointed at a small folder of images, trains and tests.
    rng = np.random.default_rng(0)
    for split, classes in (("train", 4), ("val", 3), ("test", 3)):
        for c in range(classes):
            (tmp_path / "data" / split / f"{split}{c}").mkdir(parents=True)
            for i in range(4):
                Image.fromarray((rng.random((28, 28)) > 0.5).astype(np.uint8) * 255).save(
                    tmp_path / "data" / split / f"{split}{c}" / f"{i}.png")
    fit = run(bin_folder, tmp_path, "fewshot", "fit", "-c", "omniglot_5way_1shot_cpu",
              "--data.dataset=folder", "--data.root=data", "--data.ways=3", "--data.queries=1",
              "--data.meta_batch_size=2", "--data.eval_queries=2", "--data.val_episodes=2",
              "--data.test_episodes=2", "--model.backbone.hidden_channels=4",
              "--trainer.max_steps=2", "--trainer.max_time=null", "--trainer.val_check_interval=2",
              f"--data.cache_dir={tmp_path / 'cache'}", "--trainer.enable_progress_bar=false")
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert "Test accuracy over 2 episodes (3-way 1-shot" in fit.stdout
    assert list(tmp_path.glob("runs/lightning_logs/version_0/test_results.json"))
