"""The export format: meta-trained weights as safetensors plus a JSON of how to rebuild the model.

An export is a folder of two files, so sharing a model shares no pickle::

    model.safetensors   every tensor of the MetaLearner's state_dict (network weights and any
                        learned extras, such as per-step inner learning rates)
    fewshot.json        {"format": "fewshot-export", "format_version": 1,
                         "backbone": {"class_path": ..., "init_args": {...}},
                         "hyper_parameters": {ways, inner_steps, inner_lr, eval_inner_steps, ...},
                         "preprocessing": {channels, image_size, invert, mean, std, resize},
                         "weights_sha256": ..., "source": {...}}

Nothing read from a file can run code: the weights are safetensors, the JSON is data, and the
backbone's ``class_path`` must be one of the classes named in :data:`BACKBONES` (and its norm
layer one of :data:`NORM_LAYERS`), never an arbitrary import. Newer formats bump
``format_version``; a reader refuses versions it does not know instead of guessing.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
from safetensors import SafetensorError
from torch import Tensor, nn

import fewshot
from fewshot.images import Preprocessing
from fewshot.models import Conv4, ResNet12, TransductiveBatchNorm2d
from fewshot.module import MetaLearner

FORMAT = "fewshot-export"
FORMAT_VERSION = 1
METADATA_FILE = "fewshot.json"
WEIGHTS_FILE = "model.safetensors"

# The classes a file may name. A plain dict, so a name from an untrusted file is looked up,
# never imported.
BACKBONES: dict[str, type[nn.Module]] = {
    "fewshot.models.Conv4": Conv4,
    "fewshot.models.conv4.Conv4": Conv4,
    "fewshot.models.ResNet12": ResNet12,
    "fewshot.models.resnet12.ResNet12": ResNet12,
}
NORM_LAYERS: dict[str, type[nn.Module]] = {
    "fewshot.models.TransductiveBatchNorm2d": TransductiveBatchNorm2d,
    "fewshot.models.batch_norm.TransductiveBatchNorm2d": TransductiveBatchNorm2d,
    "torch.nn.BatchNorm2d": nn.BatchNorm2d,
    "torch.nn.modules.batchnorm.BatchNorm2d": nn.BatchNorm2d,
}
HEAD_PREFIX = "network.head."
HEAD_RATES_PREFIX = "inner_lrs.head-"  # learned inner rates of the head (Meta-SGD)


class CheckpointError(ValueError):
    """A checkpoint or export that is missing, corrupt, unsafe or not a fewshot model."""


class ModelFiles(NamedTuple):
    """A meta-trained model as read from any source: metadata (the export JSON) and tensors."""

    metadata: dict[str, Any]
    state_dict: dict[str, Tensor]
    source: Path


def make_metadata(
    backbone: dict[str, Any], hyper_parameters: dict[str, Any], preprocessing: Preprocessing,
    source: dict[str, Any],
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fewshot_version": fewshot.__version__,
        "backbone": backbone,
        "hyper_parameters": hyper_parameters,
        "preprocessing": preprocessing.to_dict(),
        "source": source,
    }


def write_export(model: ModelFiles, directory: str | Path) -> Path:
    """Write ``model`` as ``directory/model.safetensors`` + ``directory/fewshot.json``."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / WEIGHTS_FILE
        tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict.items()}
        _atomic_write(weights, safetensors.torch.save(tensors))
        metadata = {**model.metadata, "weights_sha256": _sha256(weights.read_bytes())}
        _atomic_write(directory / METADATA_FILE, (json.dumps(metadata, indent=2) + "\n").encode())
    except OSError as error:
        raise CheckpointError(f"cannot write the export to {directory}: {error}") from error
    return directory


def read_export(directory: Path) -> ModelFiles:
    """Read and check an export folder written by :func:`write_export`."""
    metadata_path, weights_path = directory / METADATA_FILE, directory / WEIGHTS_FILE
    try:
        metadata = json.loads(metadata_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{metadata_path} is not a readable fewshot export ({error})") from error
    _check_metadata(metadata, metadata_path)
    try:
        data = weights_path.read_bytes()
    except OSError as error:
        raise CheckpointError(f"{weights_path} is missing or unreadable ({error}); an export "
                              f"needs both {METADATA_FILE} and {WEIGHTS_FILE}") from error
    if "weights_sha256" in metadata and _sha256(data) != metadata["weights_sha256"]:
        raise CheckpointError(f"{weights_path} is corrupt: its SHA-256 differs from the one "
                              f"recorded in {metadata_path}")
    try:
        state_dict = safetensors.torch.load(data)
    except (SafetensorError, ValueError) as error:
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({error})") from error
    return ModelFiles(metadata, state_dict, directory)


def _check_metadata(metadata: Any, path: Path) -> None:
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a fewshot export (no \"format\": \"{FORMAT}\")")
    version = metadata.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version}, but this fewshot "
            f"({fewshot.__version__}) reads up to {FORMAT_VERSION}: upgrade fewshot"
        )
    for key in ("backbone", "hyper_parameters", "preprocessing"):
        if not isinstance(metadata.get(key), dict):
            raise CheckpointError(f"{path}: \"{key}\" must be an object, got {metadata.get(key)!r}")


def build_meta_learner(
    model: ModelFiles, ways: int | None = None, reset_head: bool = False
) -> MetaLearner:
    """Rebuild the :class:`MetaLearner` of ``model`` on the CPU, in evaluation mode.

    Args:
        ways: outputs of the head (default: as trained). Another N needs ``reset_head``.
        reset_head: replace the trained head by a zero-initialised one of ``ways`` outputs
            (Kao et al., "MAML is a Noisy Contrastive Learner in Classification", ICLR 2022).
            Zero weights make every class equally likely before adaptation, and the first
            inner step then sets each class's weights from its own support images, so the head
            no longer depends on which class landed on which output.
    """
    metadata = model.metadata
    hyper_parameters = dict(metadata["hyper_parameters"])
    trained_ways = hyper_parameters.get("ways")
    if ways is not None and ways != trained_ways and not reset_head:
        raise ValueError(f"the head was trained for {trained_ways} ways; {ways} ways need "
                         "reset_head=True (a zero-initialised head)")
    if ways is not None:
        hyper_parameters["ways"] = ways
    accepted = inspect.signature(MetaLearner.__init__).parameters
    unknown = sorted(set(hyper_parameters) - set(accepted))
    if unknown or "backbone" in hyper_parameters:
        raise CheckpointError(f"{model.source}: MetaLearner of fewshot {fewshot.__version__} has "
                              f"no option(s) {unknown or ['backbone']}; was it made by another version?")
    try:
        learner = MetaLearner(backbone=build_backbone(metadata["backbone"]), **hyper_parameters)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{model.source}: cannot rebuild the model ({error})") from error
    state = dict(model.state_dict)
    if reset_head:
        for name, parameter in learner.state_dict().items():
            if name.startswith(HEAD_PREFIX):
                state[name] = parameter.new_zeros(parameter.shape)
            elif name.startswith(HEAD_RATES_PREFIX) and state[name].shape != parameter.shape:
                # Meta-SGD rates of a head with another N: classes are interchangeable, so
                # each new class gets the trained classes' mean rate (per step and feature).
                state[name] = state[name].mean(dim=1, keepdim=True).expand_as(parameter).clone()
    try:
        learner.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{model.source}: the weights do not fit the model described by "
                              f"its settings: {_first_line(str(error), 2)}") from error
    return learner.eval().requires_grad_(False)


def build_backbone(spec: Any) -> nn.Module:
    """``{"class_path": one of BACKBONES, "init_args": {...}}`` -> the backbone module."""
    cls, init_args = _lookup(spec, BACKBONES, "backbone")
    args = {}
    for name, value in init_args.items():
        if name == "norm_layer":
            norm_cls, norm_args = _lookup(value, NORM_LAYERS, "norm_layer")
            _check_scalars(norm_args, "norm_layer")
            args[name] = partial(norm_cls, **norm_args) if norm_args else norm_cls
        else:
            _check_scalars({name: value}, "backbone")
            args[name] = value
    try:
        return cls(**args)
    except TypeError as error:
        raise CheckpointError(f"cannot build backbone {spec.get('class_path')}: {error}") from error


def _lookup(spec: Any, allowed: dict[str, type[nn.Module]], what: str) -> tuple[type, dict]:
    if isinstance(spec, str):
        spec = {"class_path": spec}
    if not isinstance(spec, dict) or not isinstance(spec.get("init_args", {}), dict):
        raise CheckpointError(f"{what} must be {{\"class_path\": ..., \"init_args\": {{...}}}}, got {spec!r}")
    class_path = spec.get("class_path")
    if class_path not in allowed:
        raise CheckpointError(
            f"{what} {class_path!r} is not one fewshot rebuilds from a file (it never imports a "
            f"class a file names); known: {sorted(allowed)}"
        )
    return allowed[class_path], dict(spec.get("init_args") or {})


def _check_scalars(values: dict[str, Any], what: str) -> None:
    scalar = (bool, int, float, str, type(None))
    for name, value in values.items():
        # Lists of numbers (ResNet-12's channel widths) come back from JSON as lists.
        if isinstance(value, list) and all(isinstance(v, scalar) for v in value):
            continue
        if not isinstance(value, scalar):
            raise CheckpointError(f"{what} setting {name!r} must be a number, string, list of "
                                  f"numbers or null, got {value!r}")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    # A crash mid-write must not leave a half-written file under the final name.
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would keep a shared model from its readers
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _first_line(text: str, lines: int = 1) -> str:
    return " ".join(line.strip() for line in text.strip().splitlines()[:lines])
