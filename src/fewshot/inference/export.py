"""The export format: meta-trained weights as safetensors plus a JSON of how to rebuild the model.

An export is a folder of two files, so sharing a model shares no pickle::

    model.safetensors   the network's weights (``network.*``) and the algorithm's own learned
                        tensors (``algorithm.*``, such as per-step inner learning rates)
    fewshot.json        {"format": "fewshot-export", "format_version": 2,
                         "backbone": {"class_path": ..., "init_args": {...}}, "ways": N,
                         "algorithm": {"class_path": ..., "init_args": {...}},
                         "inner_optimizer": {"class_path": ..., "init_args": {...}},
                         "preprocessing": {channels, image_size, invert, mean, std, resize},
                         "weights_sha256": ..., "source": {...}}

Nothing read from a file can run code: the weights are safetensors, the JSON is data, and every
``class_path`` must be one of the classes registered in :data:`fewshot.models.BACKBONES`,
:data:`fewshot.algorithms.ALGORITHMS` or :data:`fewshot.core.inner_optimizers.INNER_OPTIMIZERS`,
never an arbitrary import. Format 1 (the MetaLearner's flags as ``hyper_parameters``, before
the algorithms became objects) is read and upgraded (:mod:`fewshot.inference.format1`). Newer
formats bump ``format_version``; a reader refuses versions it does not know instead of guessing.

This module imports neither Lightning nor the training shell.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor, nn

import fewshot
from fewshot.algorithms import Adapted, Algorithm, build_algorithm
from fewshot.core.inner_optimizers import build_inner_optimizer
from fewshot.inference.format1 import upgrade_format1
from fewshot.inference.images import Preprocessing
from fewshot.inference.model_card import CARD_FILE, model_card
from fewshot.models import FewShotClassifier, build_backbone

FORMAT = "fewshot-export"
FORMAT_VERSION = 2
METADATA_FILE = "fewshot.json"
WEIGHTS_FILE = "model.safetensors"

HEAD_PREFIX = "network.head."
HEAD_RATES_PREFIX = "algorithm.inner_lrs.head-"  # learned inner rates of the head (Meta-SGD)


class CheckpointError(ValueError):
    """A checkpoint or export that is missing, corrupt, unsafe or not a fewshot model."""


class ModelFiles(NamedTuple):
    """A meta-trained model as read from any source: metadata (the export JSON) and tensors."""

    metadata: dict[str, Any]
    state_dict: dict[str, Tensor]
    source: Path


def make_metadata(
    backbone: dict[str, Any], ways: int, algorithm: dict[str, Any], inner_optimizer: dict[str, Any],
    preprocessing: Preprocessing, source: dict[str, Any],
) -> dict[str, Any]:
    """Format-2 metadata: every part by its settings (``{"class_path", "init_args"}``)."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fewshot_version": fewshot.__version__,
        "backbone": backbone,
        "ways": ways,
        "algorithm": algorithm,
        "inner_optimizer": inner_optimizer,
        "preprocessing": preprocessing.to_dict(),
        "source": source,
    }


def write_export(model: ModelFiles, directory: str | Path, note: str | None = None,
                 name: str | None = None) -> Path:
    """Write ``model`` as ``directory/model.safetensors`` + ``directory/fewshot.json``, with a
    model card (``README.md``, :mod:`fewshot.inference.model_card`); ``note`` (how it was
    trained) goes into both."""
    directory = Path(directory)
    written: list[Path] = []
    target = directory
    try:
        directory.mkdir(parents=True, exist_ok=True)
        weights = directory / WEIGHTS_FILE
        tensors = {name: t.detach().cpu().contiguous() for name, t in model.state_dict.items()}
        data = safetensors.torch.save(tensors)
        metadata = {**model.metadata, "weights_sha256": _sha256(data)}
        if note:
            metadata["note"] = note
        for target, content in ((weights, data),
                                (directory / METADATA_FILE,
                                 (json.dumps(metadata, indent=2) + "\n").encode()),
                                (directory / CARD_FILE, model_card(metadata, name).encode())):
            _atomic_write(target, content)
            written.append(target)
    except OSError as error:
        # A disk that fills up half-way: no part of this export stays, so no folder holds new
        # weights beside another export's description.
        for path in written:
            path.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write the export: writing {target} failed "
                              f"({error.strerror or error}); nothing of it was left in "
                              f"{directory}") from error
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
    if metadata["format_version"] == 1:
        try:
            metadata, state_dict = upgrade_format1(metadata, state_dict)
        except ValueError as error:
            raise CheckpointError(f"{metadata_path}: {error}") from error
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
    parts = ("backbone", "hyper_parameters", "preprocessing") if version == 1 else (
        "backbone", "algorithm", "inner_optimizer", "preprocessing")
    if version > 1 and (isinstance(metadata.get("ways"), bool) or not isinstance(metadata.get("ways"), int)):
        raise CheckpointError(f"{path}: \"ways\" must be an integer, got {metadata.get('ways')!r}")
    for key in parts:
        if not isinstance(metadata.get(key), dict):
            raise CheckpointError(f"{path}: \"{key}\" must be an object, got {metadata.get(key)!r}")


class AdaptableModel(nn.Module):
    """A meta-trained model without the training shell: the network and the algorithm, with
    the state-dict keys of training (``network.*``, ``algorithm.*``)."""

    def __init__(self, network: FewShotClassifier, algorithm: Algorithm) -> None:
        super().__init__()
        self.network, self.algorithm = network, algorithm

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int | None = None,
              lr: float | None = None) -> Adapted:
        """The model adapted to one task; see :meth:`fewshot.algorithms.Algorithm.adapt`."""
        return self.algorithm.adapt(self.network, dict(self.network.named_parameters()),
                                    support_x, support_y, steps, lr)

    def predict_logits(self, adapted: Adapted, x: Tensor) -> Tensor:
        return self.algorithm.predict(self.network, adapted, x)


def build_model(model: ModelFiles, ways: int | None = None, reset_head: bool = False) -> AdaptableModel:
    """Rebuild the model of ``model`` (format 2 metadata) on the CPU, in evaluation mode.

    Args:
        ways: outputs of the head (default: as trained). Another N needs ``reset_head``.
        reset_head: replace the trained head by a zero-initialised one of ``ways`` outputs
            (Kao et al., "MAML is a Noisy Contrastive Learner in Classification", ICLR 2022).
            Zero weights make every class equally likely before adaptation, and the first
            inner step then sets each class's weights from its own support images, so the head
            no longer depends on which class landed on which output.
    """
    metadata = model.metadata
    trained_ways = metadata["ways"]
    if ways is not None and ways != trained_ways and not reset_head:
        raise ValueError(f"the head was trained for {trained_ways} ways; {ways} ways need "
                         "reset_head=True (a zero-initialised head)")
    try:
        backbone = build_backbone(metadata["backbone"])
        algorithm = build_algorithm(metadata["algorithm"])
        inner_optimizer = build_inner_optimizer(metadata["inner_optimizer"])
        network = FewShotClassifier(backbone, ways or trained_ways)
        algorithm.build(network, inner_optimizer)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{model.source}: cannot rebuild the model ({error})") from error
    adaptable = AdaptableModel(network, algorithm)
    state = dict(model.state_dict)
    if reset_head:
        for name, parameter in adaptable.state_dict().items():
            if name.startswith(HEAD_PREFIX):
                state[name] = parameter.new_zeros(parameter.shape)
            elif name.startswith(HEAD_RATES_PREFIX) and state[name].shape != parameter.shape:
                # Meta-SGD rates of a head with another N: classes are interchangeable, so
                # each new class gets the trained classes' mean rate (per step and feature).
                state[name] = state[name].mean(dim=1, keepdim=True).expand_as(parameter).clone()
    try:
        adaptable.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"{model.source}: the weights do not fit the model described by "
                              f"its settings: {_first_line(str(error), 2)}") from error
    return adaptable.eval().requires_grad_(False)


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
