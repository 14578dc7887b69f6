"""How the ``fewshot`` CLI writes, reads and finds Lightning checkpoints, so a killed run resumes.

Lightning's own writer (``lightning.fabric.utilities.cloud_io._atomic_save``) writes the
checkpoint into a temporary file in the *system* temporary folder and then moves it over the
target. When that folder is on another filesystem than the run (a tmpfs ``/tmp``, a scratch
disk), the move is a copy into the target file: a run killed during it leaves a truncated
``last.ckpt`` and nothing to resume from, plus an orphaned full-size file in ``/tmp``.

:class:`AtomicCheckpointIO` writes next to the target instead, syncs the bytes to disk and
renames the file over the target (``os.replace``, atomic on one filesystem), so a checkpoint
file is always either the previous complete one or the new complete one. Loading turns a
damaged or refused file into a :class:`~fewshot.export.CheckpointError` naming it.

:class:`ResumableModelCheckpoint` writes ``last.ckpt`` on its step schedule even before the
first validation, and :func:`find_last_checkpoint` makes ``--ckpt_path last`` find the
checkpoint of the previous run of the same experiment.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from fewshot.inference.checkpoints import check_checkpoint_bytes, describe_load_error
from fewshot.inference.export import CheckpointError
from fewshot.training.resume import (
    MACHINE_SETTINGS,
    checkpoint_record,
    flat_settings,
    setting_differences,
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """:class:`~lightning.pytorch.plugins.io.TorchCheckpointIO` whose local writes are atomic.

    Remote paths (``s3://...``) are left to Lightning. The ``fewshot`` CLI installs this plugin
    by default (``trainer.plugins``); a Trainer built in Python takes it as
    ``Trainer(plugins=[AtomicCheckpointIO()])``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{path.name}."
        fd, temporary = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                # Who wrote it, so a later fewshot can tell whether it can resume it.
                torch.save({**checkpoint, "fewshot": checkpoint_record()}, file)
                file.flush()
                os.fsync(file.fileno())  # the data is on disk before the name points at it
            os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the checkpoint from others
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        _sync_directory(path.parent)
        # Temporary files of writes that were killed half-way (only rank 0 writes a path).
        for leftover in path.parent.glob(f"{prefix}*.tmp"):
            with contextlib.suppress(OSError):
                leftover.unlink()

    def load_checkpoint(self, path: str | os.PathLike,
                        map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if isinstance(get_filesystem(path), LocalFileSystem) and os.path.isfile(path):
            check_checkpoint_bytes(Path(path))  # torch.load never checks the zip's CRC-32s
        try:
            return super().load_checkpoint(path, map_location=map_location,
                                           weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as error:  # torch.load raises many types on damaged input
            raise describe_load_error(Path(path), error) from error


class ResumableModelCheckpoint(ModelCheckpoint):
    """:class:`~lightning.pytorch.callbacks.ModelCheckpoint` whose ``last.ckpt`` never waits.

    While the monitored metric (``val/acc``) does not exist yet, that is until the first
    validation, Lightning defers the saves that ``every_n_train_steps`` asks for to the end of
    that validation, ``last.ckpt`` included: a run killed in its first epoch had nothing to
    resume from. This writes ``last.ckpt`` at those steps anyway; the best checkpoint still
    waits for the validation (the step is not marked as saved, so that save happens).

    It also writes ``last.ckpt`` after every validation: Lightning 2.6 writes it only when the
    validation also wrote a best checkpoint, so a run whose accuracy stopped improving would
    resume from its last improvement and lose the steps since.
    """

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer)
                and not self._should_save_on_train_epoch_end(trainer)):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step, every = trainer.global_step, self._every_n_train_steps
        if (not self.save_last or every < 1 or step % every != 0
                or self._last_global_step_saved == step  # saved, or nothing to save
                or trainer.sanity_checking or trainer.fast_dev_run
                or not pl_module.automatic_optimization):
            return
        saved_step = self._last_global_step_saved
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = saved_step




def find_last_checkpoint(trainer: pl.Trainer, model: pl.LightningModule,
                         datamodule: pl.LightningDataModule | None = None) -> Path | None:
    """The newest ``last.ckpt`` (or ``last-vN.ckpt``) of an earlier run with the settings of
    ``model`` and ``datamodule`` (those of :data:`MACHINE_SETTINGS` may differ), or None.

    Lightning's ``ckpt_path="last"`` looks only in the checkpoint folder of the run being
    started, and every run of the default logger starts a new ``version_N`` folder, so it would
    never find the checkpoint of the run that was interrupted. This looks in every
    ``version_*/checkpoints`` folder of the logger's experiment (and in any fixed ``dirpath``),
    where other experiments may have left theirs too.
    """
    callbacks = trainer.checkpoint_callbacks
    folders = {Path(c.dirpath) for c in callbacks if getattr(c, "dirpath", None)}
    if any(getattr(c, "dirpath", None) is None for c in callbacks):
        if trainer.loggers:
            logger = trainer.loggers[0]
            experiment = Path(logger.save_dir or trainer.default_root_dir, str(logger.name))
            folders.update(experiment.glob("*/checkpoints"))
        else:
            folders.add(Path(trainer.default_root_dir, "checkpoints"))
    found = [path for folder in folders for path in folder.glob("last*.ckpt")
             if path.stem == "last" or path.stem.startswith("last-")]
    found.sort(key=lambda path: path.stat().st_mtime_ns, reverse=True)
    ours = _settings(dict(model.hparams), dict(datamodule.hparams) if datamodule else None)
    for path in found:
        try:
            check_checkpoint_bytes(path)
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except CheckpointError:
            raise
        except Exception as error:  # torch.load raises many types on damaged input
            raise describe_load_error(path, error) from error
        if isinstance(saved, dict) and _settings(
                saved.get("hyper_parameters") or {},
                saved.get("datamodule_hyper_parameters") if datamodule else None) == ours:
            return path
    if found:
        newest = torch.load(found[0], map_location="cpu", weights_only=True)
        differences = setting_differences(
            flat_settings(newest.get("hyper_parameters") or {},
                          newest.get("datamodule_hyper_parameters") if datamodule else None),
            flat_settings(dict(model.hparams), dict(datamodule.hparams) if datamodule else None))
        rank_zero_warn(f"--ckpt_path last: the {len(found)} last checkpoint(s) found are from "
                       f"runs with other model or data settings; none is resumed, a new run "
                       f"starts. The newest, {found[0]}, differs in "
                       f"{'; '.join(differences[:5]) or 'settings'}")
    return None


def _settings(model: dict[str, Any], data: dict[str, Any] | None) -> tuple[dict, dict | None]:
    data = None if data is None else {k: v for k, v in data.items() if k not in MACHINE_SETTINGS}
    # How the tasks run never changes what is computed: a run may resume with another executor.
    model = {k: v for k, v in model.items() if k != "executor"}
    return model, data


def _sync_directory(directory: Path) -> None:
    # Makes the rename itself survive a power cut; not possible (or needed) everywhere.
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


__all__ = ["MACHINE_SETTINGS", "AtomicCheckpointIO", "ResumableModelCheckpoint",
           "find_last_checkpoint"]
