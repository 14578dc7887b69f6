"""The adapted-classifier file: a model adapted to one task, with its class names, in one file.

An export (:mod:`fewshot.inference.export`) is a model that still has to adapt; this file is the
result of adapting it, so that a classifier taught from a few images (``fewshot adapt --save``,
:meth:`Predictor.save`, the download of ``fewshot app``) predicts later without its support
images at hand. It is one safetensors file, so it holds no pickle and nothing in it can run code::

    model.<name>            the model as adapted from (network.*, algorithm.*; its head has
                            one output per class, zero-initialised where N differed)
    adapted.params.<name>   the network's parameters after adaptation
    adapted.extras.<name>   what the algorithm keeps per task (class prototypes, say)
    support_x               the prepared support images [S, C, H, W]: one-at-a-time prediction
                            normalises every query together with them
    metadata (strings)      format "fewshot-adapted", format_version 1, "model" (the export
                            metadata, JSON) and "classifier" (classes, support labels, steps,
                            lr, ..., JSON), tensors_sha256 (of every tensor, by name)

:func:`read_adapted` rebuilds the same :class:`~fewshot.inference.learner.Predictor`, so its
predictions equal the original's bit for bit. Class names are strings or integers (JSON).
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

import fewshot
from fewshot.algorithms import Adapted
from fewshot.inference.export import CheckpointError, ModelFiles, _atomic_write, build_model
from fewshot.inference.images import Preprocessing
from fewshot.inference.learner import Predictor

FORMAT = "fewshot-adapted"
FORMAT_VERSION = 1
ADAPTED_FILE = "classifier.safetensors"
SUFFIX = ".safetensors"
_HEADER_LIMIT = 100_000_000  # safetensors' own bound on the JSON header


def is_adapted_classifier(path: str | Path) -> bool:
    """Whether ``path`` names an adapted classifier: a ``.safetensors`` file other than an
    export's ``model.safetensors``, or a folder holding ``classifier.safetensors``."""
    path = Path(path).expanduser()
    if path.is_dir():
        return (path / ADAPTED_FILE).is_file()
    return path.suffix == SUFFIX and path.name != "model.safetensors" and path.is_file()


def save_adapted(predictor: Predictor, path: str | Path) -> Path:
    """Write ``predictor`` to ``path`` (a ``.safetensors`` file), or to
    ``path/classifier.safetensors`` with a README naming its classes when ``path`` is a folder.

    Returns the file written. Raises ``ValueError`` for classes that are neither strings nor
    integers, :class:`CheckpointError` when the file cannot be written.
    """
    if not predictor.model_metadata or len(predictor.support_labels) != len(predictor.support_x):
        raise ValueError("this Predictor does not know the model or the support labels it was "
                         "adapted from; make it with Learner.adapt to save it")
    for label in [*predictor.classes, *predictor.support_labels]:
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise ValueError(f"class {label!r} cannot be saved: class names must be strings or "
                             "integers")
    path = Path(path).expanduser()
    folder = None if path.suffix == SUFFIX else path
    file = path if folder is None else folder / ADAPTED_FILE
    tensors = {f"model.{k}": v for k, v in predictor.model.state_dict().items()}
    tensors |= {f"adapted.params.{k}": v for k, v in predictor.adapted.params.items()}
    tensors |= {f"adapted.extras.{k}": v for k, v in predictor.adapted.extras.items()}
    tensors["support_x"] = predictor.support_x
    # Copies: an algorithm may keep some parameters as they were (ProtoNet keeps all), and
    # safetensors refuses two names for one tensor.
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
    model_metadata = {**predictor.model_metadata, "ways": _head_outputs(predictor)}
    classifier = {
        "classes": list(predictor.classes),
        "support_labels": list(predictor.support_labels),
        "trained_ways": predictor.model_metadata.get("ways"),
        "steps": predictor.steps,
        "steps_taken": predictor.adapted.steps_taken,
        "lr": predictor.lr,
        "head_reset": predictor.head_reset,
        "batch_dependent": predictor.batch_dependent,
        "fewshot_version": fewshot.__version__,
    }
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                "model": json.dumps(model_metadata), "classifier": json.dumps(classifier),
                "tensors_sha256": tensors_sha256(tensors)}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(file, safetensors.torch.save(tensors, metadata))
        if folder is not None:
            _atomic_write(folder / "README.md", _card(classifier, model_metadata).encode())
    except OSError as error:
        raise CheckpointError(f"cannot write the adapted classifier to {file}: {error}") from error
    return file


def read_adapted(path: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """The :class:`Predictor` saved at ``path`` (a file or a folder, see :func:`save_adapted`).

    Raises:
        CheckpointError: missing, corrupt or not an adapted classifier; the message names it.
    """
    path = Path(path).expanduser()
    file = path / ADAPTED_FILE if path.is_dir() else path
    metadata = _header_metadata(file)
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a fewshot adapted classifier (no \"format\": "
                              f"\"{FORMAT}\" in its metadata)")
    version = metadata.get("format_version", "")
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise CheckpointError(f"{file} has format_version {version!r}, but this fewshot "
                              f"({fewshot.__version__}) reads up to {FORMAT_VERSION}: upgrade fewshot")
    try:
        tensors = safetensors.torch.load_file(file)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{file} is not a readable safetensors file ({error})") from error
    if tensors_sha256(tensors) != metadata.get("tensors_sha256"):
        raise CheckpointError(f"{file} is corrupt: its tensors' SHA-256 differs from the one "
                              "recorded in it")
    try:
        model_metadata = json.loads(metadata["model"])
        info = json.loads(metadata["classifier"])
        classes, labels = info["classes"], info["support_labels"]
        preprocessing = Preprocessing.from_dict(model_metadata["preprocessing"])
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{file}: its metadata is incomplete or malformed ({error})") from error
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model = build_model(ModelFiles(model_metadata, state, file)).to(device)
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{file}: its model metadata is incomplete ({error})") from error
    params = _part(tensors, "adapted.params.")
    expected = {n: p.shape for n, p in model.network.named_parameters()}
    if {n: p.shape for n, p in params.items()} != expected:
        raise CheckpointError(f"{file}: its adapted parameters do not fit its model")
    support_x = tensors.get("support_x")
    if (support_x is None or support_x.dim() != 4 or len(support_x) != len(labels)
            or not isinstance(classes, list) or len(set(map(str, classes))) != len(classes)
            or len(classes) < 2 or not set(map(str, labels)) <= set(map(str, classes))):
        raise CheckpointError(f"{file}: its classes, support labels and support images disagree")
    adapted = Adapted({n: t.to(device) for n, t in params.items()}, int(info["steps_taken"]),
                      {n: t.to(device) for n, t in _part(tensors, "adapted.extras.").items()})
    original = {**model_metadata, "ways": info.get("trained_ways", model_metadata["ways"])}
    return Predictor(model, adapted, classes, support_x.to(device), preprocessing,
                     bool(info["batch_dependent"]), int(info["steps"]), info["lr"],
                     bool(info["head_reset"]), labels, original)


def tensors_sha256(tensors: dict[str, Tensor]) -> str:
    """SHA-256 of tensors by name, dtype, shape and bytes, independent of the file's layout."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _head_outputs(predictor: Predictor) -> int:
    if predictor.model.algorithm.uses_head:
        return predictor.model.network.head.out_features
    return int(predictor.model_metadata["ways"])  # prototypes: the head is never used


def _part(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _header_metadata(file: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its header alone."""
    try:
        with file.open("rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            if length > _HEADER_LIMIT:
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(stream.read(length))
    except FileNotFoundError as error:
        raise CheckpointError(f"adapted classifier {file} does not exist") from error
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{file} is not a readable safetensors file ({error})") from error
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _card(classifier: dict[str, Any], model: dict[str, Any]) -> str:
    classes = ", ".join(f"{c} ({classifier['support_labels'].count(c)} images)"
                        for c in classifier["classes"])
    source = model.get("source") or {}
    return f"""# An adapted fewshot classifier

Classes: {classes}.

Adapted with {classifier['steps']} step(s) from a {source.get('dataset') or 'fewshot'}
{classifier['trained_ways']}-way model (`{source.get('checkpoint', '?')}`).

```bash
fewshot predict --checkpoint THIS_FOLDER --query new_images/
```

```python
import fewshot

classifier = fewshot.load("THIS_FOLDER")
print(classifier.predict(["new.png"]).labels)
```

`{ADAPTED_FILE}` holds the weights, the adapted weights, the prepared support images and the
class names (safetensors: no pickle, nothing in it can run code).
"""
