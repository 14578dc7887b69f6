"""SIGKILL a CPU ``fewshot fit`` at several points, one of them half-way through writing
``last.ckpt``; the restarted runs must end exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import random
import signal

from cli_runs import (
    MAX_STEPS,
    assert_same_training_state,
    final_checkpoint,
    load,
    run,
    steps_logged,
    training_rows,
    versions,
)

from fewshot.data.episodes import StepSampler

KILLED = -signal.SIGKILL


def test_runs_killed_anywhere_resume_to_the_exact_weights_optimizer_and_metrics(
        fake_cli, uninterrupted_runs, tmp_path):
    delays = random.Random(7)  # where exactly each kill lands varies; the seed fixes the draw
    restored = []

    def resume(**options):
        newest = max(tmp_path.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime_ns, default=None)
        result = run(fake_cli, tmp_path, **options)
        restored.append(newest)
        if newest is None:
            assert "there is no last checkpoint available" in result.stderr, result.stderr
        else:  # --ckpt_path last found the previous run's checkpoint, not this run's folder
            assert f"Restored all states from the checkpoint at {newest}" in result.stderr
        return result

    # 1. Killed as soon as its run folder appears, before any checkpoint: nothing to resume.
    first = resume(kill_when=lambda folder: True)
    assert first.returncode == KILLED and not list(tmp_path.rglob("*.ckpt"))

    # 2. Starts over; killed a random moment after its second meta-iteration.
    second = resume(kill_when=lambda folder: steps_logged(folder) >= 2,
                    delay=delays.uniform(0.0, 0.15))
    assert second.returncode == KILLED, second.stderr
    resumed_at = load(second.folder / "checkpoints" / "last.ckpt")["global_step"]
    assert 2 <= resumed_at < MAX_STEPS

    # 3. Resumes; killed a random moment after two more (there is a validation every 4 steps).
    third = resume(kill_when=lambda folder: steps_logged(folder) >= 2,
                   delay=delays.uniform(0.0, 0.15))
    assert third.returncode == KILLED, third.stderr
    step = load(third.folder / "checkpoints" / "last.ckpt")["global_step"]
    assert resumed_at < step < MAX_STEPS

    # 4. Resumes; killed half-way through writing its second last.ckpt.
    report = tmp_path / "kill-report.json"
    fourth = resume(FEWSHOT_KILL_DURING_SAVE="2", FEWSHOT_KILL_REPORT=str(report))
    assert fourth.returncode == KILLED, fourth.stderr
    killed_write = json.loads(report.read_text())
    checkpoints = fourth.folder / "checkpoints"
    partial = checkpoints / killed_write["file"].rsplit("/", 1)[-1]
    # The bytes were going to disk next to last.ckpt, and half of them got there ...
    assert partial.parent == checkpoints and partial.name != "last.ckpt"
    assert partial.stat().st_size == killed_write["written"] < killed_write["size"]
    # ... while last.ckpt is still the complete checkpoint of the step before.
    assert load(checkpoints / "last.ckpt")["global_step"] == step + 1

    # 5. Resumes from that checkpoint and runs to the end.
    last = resume()
    assert last.returncode == 0, last.stderr
    assert restored[-1] == checkpoints / "last.ckpt"
    assert len(versions(tmp_path)) == 5

    reference_run, _ = uninterrupted_runs()  # started with this test, ran alongside
    assert_same_training_state(final_checkpoint(tmp_path), final_checkpoint(reference_run))
    # Every logged training value, including those of steps a killed run logged and the next
    # run repeated, is the uninterrupted run's value for that step.
    reference = {row["step"]: row for row in training_rows(reference_run)}
    assert [int(step) for step in reference] == list(range(MAX_STEPS))
    logged = training_rows(tmp_path)
    for row in logged:
        assert row == reference[row["step"]]
    # Lightning writes a step's checkpoint before that step's row of metrics, so a kill between
    # the two loses that one row (the next run starts after the step). Nothing else is lost.
    resumed_after = {str(load(path)["global_step"] - 1) for path in restored if path is not None}
    assert set(reference) - {row["step"] for row in logged} <= resumed_after


def test_a_run_resumed_in_a_later_epoch_gets_the_tasks_of_its_steps():
    # Lightning iterates the resumed epoch before it calls set_epoch: the sampler must already
    # be in the epoch of its first step (here step 7 of 4-step epochs: epoch 1, steps 7 then 8).
    resumed = StepSampler(steps_per_epoch=4, first_step=7)
    assert list(resumed) == [7]
    resumed.set_epoch(2)
    assert list(resumed) == [8, 9, 10, 11]
