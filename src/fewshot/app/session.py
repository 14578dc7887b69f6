"""The model behind the page: what it is, adapting it to the page's classes, predicting.

One adaptation at a time (a lock): the page's requests come from several threads, and the
model's tensors are shared.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from fewshot.app.workspace import Workspace, WorkspaceError
from fewshot.inference.images import ImageError
from fewshot.inference.learner import Learner, Predictor

TOP_K = 3


class Session:
    """A loaded model (``learner``, named ``model_name`` on the page) and the page's workspace."""

    def __init__(self, learner: Learner, model_name: str, workspace: Workspace) -> None:
        self.learner, self.model_name, self.workspace = learner, model_name, workspace
        self.predictor: Predictor | None = None
        self.adapted_version: int | None = None
        self.adapt_seconds: float | None = None
        self._lock = threading.Lock()

    def describe_model(self) -> dict[str, Any]:
        """What the page says about the model (from its metadata, i.e. its model card)."""
        metadata = self.learner.metadata
        source = metadata.get("source") or {}
        preprocessing = self.learner.preprocessing
        test = source.get("test")
        accuracy = (f"{100 * test['accuracy']:.2f} ± {100 * test['ci95']:.2f}% on "
                    f"{test['episodes']} test episodes ({test.get('ways', metadata['ways'])}-way "
                    f"{test.get('shots', source.get('shots', '?'))}-shot)"
                    if test else "not recorded in the model")
        colour = "grayscale" if preprocessing.channels == 1 else "RGB"
        if self.learner.batch_dependent:
            batch_norm = ("transductive: the query images are normalised together as one batch, "
                          "as in meta-training, so each prediction depends on the others; tick "
                          "'one at a time' to normalise each with the support images only")
        else:
            batch_norm = "running statistics: every image is predicted on its own"
        rate = self.learner.lr
        return {
            "name": self.model_name,
            "dataset": source.get("dataset") or "not recorded",
            "ways": self.learner.ways,
            "shots": source.get("shots"),
            "algorithm": _class_name(metadata.get("algorithm")),
            "backbone": _class_name(metadata.get("backbone")),
            "accuracy": accuracy,
            "images": f"{preprocessing.image_size}x{preprocessing.image_size} {colour}"
                      f"{' (inverted: draw dark on light)' if preprocessing.invert else ''}",
            "adaptation": f"{self.learner.steps} step(s), learning rate "
                          f"{'learned' if rate is None else f'{rate:g}'}",
            "batch_norm": batch_norm,
            "batch_dependent": self.learner.batch_dependent,
        }

    def adapt(self) -> dict[str, Any]:
        """Adapt to the workspace's classes; refused (409) when the task is incomplete."""
        paths, labels, version = self.workspace.support()
        with self._lock:
            start = time.perf_counter()
            try:
                predictor = self.learner.adapt(paths, labels)
            except (ImageError, ValueError) as error:
                raise WorkspaceError(_without_folder(str(error), self.workspace.folder)) from error
            self.predictor, self.adapted_version = predictor, version
            self.adapt_seconds = time.perf_counter() - start
        return self.adapted_state()

    def adapted_state(self) -> dict[str, Any] | None:
        """The classes adapted to, with their image counts, and whether the page changed since."""
        predictor = self.predictor
        if predictor is None:
            return None
        counts = {name: predictor.support_labels.count(name) for name in predictor.classes}
        return {"classes": [{"name": n, "images": c} for n, c in counts.items()],
                "steps": predictor.steps, "seconds": self.adapt_seconds,
                "stale": self.adapted_version != self.workspace.support_version}

    def predict(self, one_at_a_time: bool = False) -> dict[str, Any]:
        """Predictions for every query image, in one batch (or one at a time)."""
        predictor = self._current_predictor()
        queries = list(self.workspace.snapshot()["queries"])
        if not queries:
            return {"predictions": [], "batching": None, "seconds": 0.0}
        with self._lock:
            start = time.perf_counter()
            try:
                predictions = predictor.predict(
                    [self.workspace.image(q["id"]).path for q in queries], one_at_a_time)
            except (ImageError, WorkspaceError) as error:
                raise WorkspaceError(f"{_without_folder(str(error), self.workspace.folder)}; "
                                     "predict again", 409) from error
            seconds = time.perf_counter() - start
        rows = [{"id": query["id"], "name": query["name"], "label": label, "probability": p,
                 "top": [{"class": c, "probability": q} for c, q in best]}
                for query, label, p, best in zip(queries, predictions.labels,
                                                 predictions.confidences,
                                                 predictions.top_k(TOP_K), strict=True)]
        batching = _without_folder(predictions.batching, self.workspace.folder)
        return {"predictions": rows, "batching": batching, "seconds": seconds}

    def save_classifier(self, path: Path) -> Path:
        """Write the adapted classifier (:mod:`fewshot.inference.adapted`) to ``path``."""
        return self._current_predictor().save(path)

    def _current_predictor(self) -> Predictor:
        if self.predictor is None:
            raise WorkspaceError("nothing adapted yet: add classes with images and press Adapt", 409)
        if self.adapted_version != self.workspace.support_version:
            raise WorkspaceError("the classes changed since the model adapted: press Adapt "
                                 "again", 409)
        return self.predictor


def _class_name(settings: Any) -> str:
    if isinstance(settings, dict):
        settings = settings.get("class_path", "?")
    return str(settings).rpartition(".")[2]


def _without_folder(message: str, folder: Path) -> str:
    """A message without the server's temporary folder in it (the page shows file names)."""
    return message.replace(f"{folder}/", "")
