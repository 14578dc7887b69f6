"""Two ``fewshot fit`` processes started at the same moment, on one cold ``FEWSHOT_CACHE_DIR``
and with one output folder: both succeed, the cache they both built is valid, and each run has
a run folder of its own (neither writes into the other's files)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
from cli_runs import finish, load, start, steps_logged, versions

from fewshot.data.split_cache import load_split

ROUNDS = 2
STEPS = 4


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(ROUNDS))
def test_two_runs_started_together_share_a_cold_cache_and_never_share_files(
        fake_cli, tmp_path, round_):
    fake = dataclasses.replace(fake_cli, cache=tmp_path / "cold-cache")  # nothing decoded yet
    out = tmp_path / "runs"
    # Two new runs (not --ckpt_path last: the second could resume the first).
    started = [start(fake, out, f"--trainer.max_steps={STEPS}", "--ckpt_path=null")
               for _ in range(2)]
    for process, stderr in started:
        finished = finish(process, stderr)
        assert finished.returncode == 0, finished.stderr[-3000:]
    # The cache: one complete array and description per split file, nothing half-written.
    files = sorted(p.name for p in fake.cache.rglob("*") if p.is_file())
    assert not [name for name in files if name.endswith(".tmp") or name.startswith(".")], files
    descriptions = list(fake.cache.rglob("*.json"))
    assert descriptions and len(files) == 2 * len(descriptions), files
    for description in descriptions:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "Ignoring corrupt cache" would fail here
            stored = load_split(description.parent, description.stem)
        assert stored is not None and stored.images.shape[0] == sum(stored.class_sizes)
    # The runs: two folders, each with all its own steps and files.
    folders = versions(out)
    assert [f.name for f in folders] == ["version_0", "version_1"]
    for folder in folders:
        assert steps_logged(folder) == STEPS, folder
        assert (folder / "config.yaml").is_file() and (folder / "hparams.yaml").is_file()
        (checkpoint,) = (folder / "checkpoints").glob("last.ckpt")
        assert load(checkpoint)["global_step"] == STEPS


def test_two_loggers_resolving_their_folder_at_once_claim_different_ones(tmp_path):
    """The race above without processes: both look before either writes (the folder is
    claimed by creating it, not found free and written later)."""
    from fewshot.training.loggers import RunLogger

    first, second = RunLogger(save_dir=str(tmp_path)), RunLogger(save_dir=str(tmp_path))
    assert (first.version, second.version) == (0, 1)
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0",
                                                                               "version_1"]
