"""Find and read a meta-trained model: an export folder, a Lightning run folder or a ``.ckpt``.

Lightning checkpoints are pickles, so they are read with ``torch.load(weights_only=True)``,
which refuses to call anything: a file that asks to (a code-execution payload) is reported,
not run. The backbone is rebuilt from the run's ``config.yaml`` (read with ``yaml.safe_load``)
when there is one, else inferred from the shapes of the weights; how the training images were
prepared comes from the data-module settings Lightning stores in the checkpoint.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from fewshot.data.download import sha256sum
from fewshot.inference.export import (
    METADATA_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    ModelFiles,
    make_metadata,
    read_export,
)
from fewshot.inference.format1 import upgrade_format1
from fewshot.inference.images import Preprocessing
from fewshot.pretrained import pretrained_names, pretrained_path

CONV4_WEIGHTS = [f"network.features.blocks.{index}.weight" for index in (0, 4, 8, 12)]


def read_model(path: str | Path) -> ModelFiles:
    """Read a model from an export, a run folder, a Lightning checkpoint file, or the name of a
    model shipped in the package (:mod:`fewshot.pretrained`, e.g. ``omniglot-5way-1shot``).

    A run folder is ``lightning_logs/version_N`` (or a folder holding such versions, of which
    the latest is used); its ``checkpoints/best-*.ckpt`` is preferred over ``last.ckpt``.
    """
    path = Path(path).expanduser()
    if not path.exists() and pretrained_path(str(path)) is not None:
        path = pretrained_path(str(path))  # a model shipped in the package, by name
    if not path.exists():
        shipped = ", ".join(pretrained_names()) or "none"
        raise CheckpointError(f"checkpoint {path} does not exist (nor is it the name of a model "
                              f"shipped with fewshot: {shipped})")
    if path.is_dir():
        if (path / METADATA_FILE).exists() or (path / WEIGHTS_FILE).exists():
            return read_export(path)
        return read_lightning_checkpoint(find_run_checkpoint(path))
    if path.name in (METADATA_FILE, WEIGHTS_FILE):
        return read_export(path.parent)
    return read_lightning_checkpoint(path)


def find_run_checkpoint(directory: Path) -> Path:
    """The checkpoint to use in a run folder (see :func:`read_model`)."""
    versions = [directory] if (directory / "checkpoints").is_dir() else sorted(
        (d for d in [*directory.glob("version_*"), *directory.glob("lightning_logs/version_*")]
         if (d / "checkpoints").is_dir()),
        key=lambda d: int(m.group(1)) if (m := re.fullmatch(r"version_(\d+)", d.name)) else -1,
    )
    folder = versions[-1] / "checkpoints" if versions else directory
    found = sorted(folder.glob("*.ckpt"))
    best = [c for c in found if c.name.startswith("best")]
    if len(best) == 1:
        return best[0]
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointError(
            f"no checkpoint in {directory}: expected an export ({METADATA_FILE} + {WEIGHTS_FILE}), "
            "a run folder with checkpoints/*.ckpt, or a folder of lightning_logs/version_N runs"
        )
    raise CheckpointError(f"{folder} holds {len(found)} checkpoints and no last.ckpt; "
                          f"pass one of them: {', '.join(c.name for c in found)}")


def read_lightning_checkpoint(path: Path) -> ModelFiles:
    checkpoint = _load_weights_only(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (it has no state_dict)")
    state_dict = checkpoint["state_dict"]
    if not all(isinstance(t, Tensor) for t in state_dict.values()):
        raise CheckpointError(f"{path}: its state_dict holds something other than tensors")
    hyper_parameters = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items()
                        if not k.startswith("_")}  # Lightning's own entries, e.g. _instantiator
    config_path = _run_config_path(path)
    config = _read_config(config_path) if config_path else {}
    data = checkpoint.get("datamodule_hyper_parameters") or config.get("data")
    if not isinstance(data, dict) or not {"image_size", "channels"} <= set(data):
        raise CheckpointError(
            f"{path} does not say how its training images were prepared (no data-module "
            "settings in it, and no config.yaml next to it): export it from the run that made it"
        )
    recorded = hyper_parameters.get("backbone")
    backbone_spec = (config.get("model") or {}).get("backbone")
    if isinstance(recorded, dict):  # checkpoints since the algorithms became objects
        backbone = recorded
    elif backbone_spec is not None:
        backbone = _backbone_from_config(backbone_spec, data, config_path)
    else:
        backbone = _infer_conv4(state_dict, data, path)
    try:
        preprocessing = Preprocessing.for_dataset(data.get("dataset", "omniglot"),
                                                  data["image_size"], data["channels"],
                                                  data.get("resize") or "squash")
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from error
    source = _source(path, checkpoint, data)
    state_dict = dict(state_dict)
    if "algorithm" in hyper_parameters:
        metadata = make_metadata(backbone, hyper_parameters.get("ways", 5),
                                 hyper_parameters["algorithm"],
                                 hyper_parameters.get("inner_optimizer") or {"class_path": "fewshot.core.inner_optimizers.sgd.SGD"},
                                 preprocessing, source)
    else:  # a checkpoint of the MetaLearner with flags (before the algorithms were objects)
        try:
            metadata, state_dict = upgrade_format1(
                {"backbone": backbone, "hyper_parameters": hyper_parameters,
                 "preprocessing": preprocessing.to_dict(), "source": source}, state_dict)
        except ValueError as error:
            raise CheckpointError(f"{path}: {error}") from error
        metadata = {**make_metadata(metadata["backbone"], metadata["ways"], metadata["algorithm"],
                                    metadata["inner_optimizer"], preprocessing, source),
                    "upgraded_from_format": 1}
    return ModelFiles(metadata, state_dict, path)


def _source(path: Path, checkpoint: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Where a checkpoint came from, for the export's metadata and model card: its step and
    hash, the data settings, the training time (the Timer of a time-limited run) and the
    test result of its run folder when that test scored this very checkpoint."""
    checkpoint_sha256 = sha256sum(path)
    timers = [state for name, state in (checkpoint.get("callbacks") or {}).items()
              if str(name).startswith("Timer") and isinstance(state, dict)]
    elapsed = (timers[0].get("time_elapsed") or {}) if timers else {}
    source = {"checkpoint": path.name, "checkpoint_sha256": checkpoint_sha256,
              "global_step": checkpoint.get("global_step"), "dataset": data.get("dataset"),
              "class_split": data.get("class_split"), "data_seed": data.get("seed"),
              "shots": data.get("shots"),
              "training_seconds": round(float(sum(elapsed.values())), 1) if elapsed else None,
              "versions": {"torch": torch.__version__}}
    results = path.parent.parent / "test_results.json"
    try:
        test = json.loads(results.read_text()) if results.is_file() else None
    except (OSError, ValueError):
        test = None
    if isinstance(test, dict) and (test.get("provenance") or {}).get(
            "checkpoint_sha256") == checkpoint_sha256:
        source["test"] = {key: test.get(key) for key in ("accuracy", "ci95", "episodes",
                                                         "inner_steps", "ways", "shots")}
        source["test"]["episodes_sha256"] = test["provenance"].get("test_episodes_sha256")
    return source


def check_checkpoint_bytes(path: Path) -> None:
    """Raise :class:`CheckpointError` naming ``path`` and the damaged record if a byte of the
    checkpoint changed since it was written.

    ``torch.save`` writes a zip archive with a CRC-32 per record, but ``torch.load`` never
    checks them: a flipped bit in a tensor loads as a silently different weight. This reads
    every record once and compares (about as fast as reading the file). Files that are not zip
    archives (the legacy format) are left to ``torch.load``.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except zipfile.BadZipFile:
        return  # not a zip: torch.load names the problem (or reads a legacy checkpoint)
    except (OSError, EOFError, zipfile.LargeZipFile) as error:
        raise CheckpointError(f"{path} is unreadable ({error})") from error
    except Exception as error:  # a damaged header: zipfile raises many types
        raise CheckpointError(f"{path} is corrupt: its zip structure is damaged "
                              f"({type(error).__name__}: {error})") from error
    if damaged is not None:
        raise CheckpointError(f"{path} is corrupt: record {damaged} does not match the CRC-32 "
                              "written with it (a changed byte on disk); use another checkpoint")


def _load_weights_only(path: Path) -> Any:
    check_checkpoint_bytes(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types on damaged input
        raise describe_load_error(path, error) from error


def describe_load_error(path: Path, error: Exception) -> CheckpointError:
    """The :class:`CheckpointError` for a file ``torch.load`` failed on: refused or damaged."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    culprit = next((line for line in lines if "GLOBAL" in line), None)
    if culprit is not None:
        return CheckpointError(f"{path} was refused: loading it would run code it names, "
                               f"which fewshot never does. {culprit}")
    # The weights-only unpickler's own words are the useful part, not its generic preamble.
    detail = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
    return CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint "
                           f"({type(error).__name__}: {detail[:200]})")


def _run_config_path(checkpoint: Path) -> Path | None:
    # Lightning CLI writes version_N/config.yaml and version_N/checkpoints/*.ckpt.
    for folder in (checkpoint.parent.parent, checkpoint.parent):
        if (folder / "config.yaml").is_file():
            return folder / "config.yaml"
    return None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise CheckpointError(f"{path} is not a readable run configuration ({error})") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a run configuration (expected a mapping)")
    return config


def _backbone_from_config(spec: Any, data: dict[str, Any], config_path: Path | None) -> dict:
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, dict):
        raise CheckpointError(f"{config_path}: model.backbone is not a class_path/init_args mapping")
    init_args = dict(spec.get("init_args") or {})
    # The CLI links these from the data settings, so config.yaml leaves them out.
    init_args.setdefault("in_channels", data["channels"])
    init_args.setdefault("image_size", data["image_size"])
    return {"class_path": spec.get("class_path"), "init_args": init_args}


def _infer_conv4(state_dict: dict[str, Tensor], data: dict[str, Any], path: Path) -> dict:
    shapes = [tuple(state_dict[k].shape) if k in state_dict else None for k in CONV4_WEIGHTS]
    if any(s is None or len(s) != 4 for s in shapes):
        raise CheckpointError(
            f"cannot tell the backbone of {path}: there is no config.yaml next to it and its "
            "weights are not those of a fewshot Conv4"
        )
    hidden_channels, in_channels = shapes[0][:2]
    # torch's BatchNorm2d counts its batches; fewshot's batch norms (MAML++'s per-step ones are
    # made from the transductive kind by MetaLearner itself) do not.
    tracks_statistics = "network.features.blocks.1.num_batches_tracked" in state_dict
    norm = "torch.nn.BatchNorm2d" if tracks_statistics else "fewshot.models.TransductiveBatchNorm2d"
    return {"class_path": "fewshot.models.Conv4",
            "init_args": {"in_channels": in_channels, "hidden_channels": hidden_channels,
                          "image_size": data["image_size"], "norm_layer": {"class_path": norm}}}
