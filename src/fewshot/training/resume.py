"""What ``fewshot fit --ckpt_path ...`` resumes, said before it happens.

Lightning restores a checkpoint without a word: a run that had already reached
``max_steps`` is "resumed" and stops at once, and a checkpoint of other settings is loaded
into a model built from the new ones. :func:`check_resume` reads the checkpoint first and

- refuses one written in a checkpoint format this fewshot does not read (:data:`CHECKPOINT_FORMAT`,
  recorded in every checkpoint the CLI writes), naming both formats and versions;
- refuses one whose model or data settings differ from the command's (meta-batch size,
  algorithm, dataset...), naming each difference; settings that only say where the data is
  (:data:`MACHINE_SETTINGS`), how the tasks run (the
  executor) or how many evaluation episodes are drawn (:data:`EVALUATION_SETTINGS`) may change,
  with a warning for the latter;
- returns the line to print: the run and step it continues, or that the run had finished.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import fewshot
from fewshot.inference.checkpoints import check_checkpoint_bytes, describe_load_error

# Bumped when a checkpoint of the previous format can no longer be resumed (state-dict keys,
# optimizer layout, loop state). Checkpoints written before it was recorded are format 1.
CHECKPOINT_FORMAT = 1

# Settings that decide what is evaluated, not what is trained: a resumed run may change them.
EVALUATION_SETTINGS = frozenset({"data.val_episodes", "data.test_episodes", "data.eval_queries",
                                 "data.eval_seed"})
# Data settings that say where the data is and how it is read, not which tasks a step trains on.
MACHINE_SETTINGS = frozenset({"root", "cache_dir", "num_workers", "download"})
# Those, and how the tasks run (the executor): never what is computed.
IGNORED_SETTINGS = frozenset({f"data.{name}" for name in MACHINE_SETTINGS} | {"model.executor"})


class ResumeError(ValueError):
    """A checkpoint that must not be resumed by this command, and why."""


def checkpoint_record() -> dict[str, Any]:
    """What every checkpoint the CLI writes says about who wrote it (key ``"fewshot"``)."""
    return {"version": fewshot.__version__, "checkpoint_format": CHECKPOINT_FORMAT}


def flat_settings(model: Mapping[str, Any], data: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{"model.algorithm.init_args.inner_lr": 0.4, "data.meta_batch_size": 2, ...}``."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) or hasattr(value, "items") and callable(value.items):
            for key, inner in value.items():
                if not str(key).startswith("_"):  # Lightning's own entries (_instantiator)
                    walk(f"{prefix}.{key}", inner)
        else:
            flat[prefix] = value

    walk("model", dict(model))
    if data is not None:
        walk("data", dict(data))
    return flat


def setting_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"data.meta_batch_size: 2 in the checkpoint, 4 now"`` per differing setting."""
    differences = []
    for key in sorted(set(saved) | set(current)):
        if any(key == s or key.startswith(s + ".") for s in IGNORED_SETTINGS):
            continue
        missing = object()
        was, now = saved.get(key, missing), current.get(key, missing)
        if key.endswith("class_path") and _canonical(was) == _canonical(now):
            continue  # fewshot.models.Conv4 is fewshot.models.conv4.Conv4
        if was != now:
            differences.append(f"{key}: {'unset' if was is missing else repr(was)} in the "
                               f"checkpoint, {'unset' if now is missing else repr(now)} now")
    return differences


def _canonical(class_path: Any) -> Any:
    """The defining module and name of the class ``class_path`` names (jsonargparse has
    already imported it), or ``class_path`` itself."""
    if not isinstance(class_path, str) or "." not in class_path:
        return class_path
    module_name, _, name = class_path.rpartition(".")
    module = sys.modules.get(module_name)
    found = getattr(module, name, None) if module is not None else None
    if isinstance(found, type):
        return f"{found.__module__}.{found.__qualname__}"
    return class_path


def check_model_settings_kept(path: str | None, asked: Any, restored: Any) -> None:
    """Raise :class:`ResumeError` naming each model setting of the command (``asked``) that
    the checkpoint's (``restored``, as LightningCLI merged them) replaced."""
    if not path or asked is None or restored is None:
        return
    as_dict = (lambda n: n.as_dict() if hasattr(n, "as_dict") else dict(n))  # noqa: E731
    restored_flat, asked_flat = (flat_settings(as_dict(restored), None),
                                 flat_settings(as_dict(asked), None))
    # Settings linked from the data (model.ways) are absent before instantiation: compare those
    # the command does hold.
    shared = set(restored_flat) & set(asked_flat)
    differences = setting_differences({k: restored_flat[k] for k in shared},
                                      {k: asked_flat[k] for k in shared})
    if differences:
        raise ResumeError(f"--ckpt_path {path} is a run with other model settings; resuming it "
                          f"would train the checkpoint's model, not the one asked for: "
                          f"{'; '.join(differences)}. Start a new run (leave out --ckpt_path), "
                          "or give the run's own settings")


def check_resume(path: Path, model_settings: Mapping[str, Any],
                 data_settings: Mapping[str, Any] | None, max_steps: int) -> tuple[str, list[str]]:
    """The line saying what resuming from ``path`` continues, and warnings (evaluation
    settings that change); raises :class:`ResumeError` if it must not be resumed."""
    check_checkpoint_bytes(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types on damaged input
        raise describe_load_error(path, error) from error
    if not isinstance(checkpoint, dict):
        raise ResumeError(f"--ckpt_path {path} is not a Lightning checkpoint")
    record = checkpoint.get("fewshot") or {}
    written_format = record.get("checkpoint_format", 1)
    if written_format != CHECKPOINT_FORMAT:
        raise ResumeError(
            f"--ckpt_path {path} was written by fewshot {record.get('version', '?')} in "
            f"checkpoint format {written_format}; this fewshot ({fewshot.__version__}) resumes "
            f"format {CHECKPOINT_FORMAT} only. Evaluate or export it with the fewshot that wrote "
            "it, or start a new run")
    saved = flat_settings(checkpoint.get("hyper_parameters") or {},
                          (checkpoint.get("datamodule_hyper_parameters") or {})
                          if data_settings is not None else None)
    differences = setting_differences(saved, flat_settings(model_settings, data_settings))
    refused = [d for d in differences if d.split(":")[0] not in EVALUATION_SETTINGS]
    if refused:
        raise ResumeError(f"--ckpt_path {path} is a run with other settings; resuming it would "
                          f"train something else than asked: {'; '.join(refused)}. Start a new "
                          "run (leave out --ckpt_path), or give the run's own settings")
    warnings = [f"resuming {path} with other evaluation settings: {d}" for d in differences]
    step = int(checkpoint.get("global_step", 0))
    run = path.parent.parent.name if path.parent.name == "checkpoints" else str(path.parent)
    if max_steps is not None and max_steps >= 0 and step >= max_steps:
        return (f"--ckpt_path: run {run} had already finished (step {step} of "
                f"--trainer.max_steps {max_steps}); nothing is trained. Its checkpoint: {path}. "
                "To train further raise --trainer.max_steps; to train a new run leave out "
                "--ckpt_path"), warnings
    of = f" of {max_steps}" if max_steps is not None and max_steps >= 0 else ""
    return f"Resuming run {run} from step {step}{of} ({path})", warnings


__all__ = ["CHECKPOINT_FORMAT", "EVALUATION_SETTINGS", "IGNORED_SETTINGS", "MACHINE_SETTINGS",
           "ResumeError", "check_model_settings_kept",
           "check_resume", "checkpoint_record", "flat_settings", "setting_differences"]
