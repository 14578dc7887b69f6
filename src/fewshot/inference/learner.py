"""Use a meta-trained model on a new task: adapt on a few labelled images, then predict.

    learner = fewshot.load("runs/lightning_logs/version_0")       # or a .ckpt, or an export
    predictor = learner.adapt(["cat1.png", "dog1.png", "dog2.png"], ["cat", "dog", "dog"])
    predictions = predictor.predict(["unknown.png"])
    predictions.labels, predictions.probabilities                 # ["dog"], tensor [1, 2]

(The README has the runnable version, executed by tests/inference/test_learner.py.)

Adaptation is the model's own evaluation inner loop (its algorithm's ``adapt``: the trained
number of steps and learning rate unless overridden), so whatever the model learned to do at
adaptation time, it does here. Any number of classes N and any number of images per class work:
when N differs from the N the head was trained for, the head is replaced by a zero-initialised
one (:func:`fewshot.inference.export.build_model`). Nothing here imports Lightning or the
training shell.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewshot.algorithms import Adapted
from fewshot.inference.checkpoints import read_model
from fewshot.inference.export import (
    AdaptableModel,
    CheckpointError,
    ModelFiles,
    build_model,
    write_export,
)
from fewshot.inference.images import ImageError, ImageInput, Preprocessing


def load(path: str | Path, device: str | torch.device = "cpu") -> Learner | Predictor:
    """Load a meta-trained model from an export folder, a run folder or a Lightning ``.ckpt``.

    An adapted classifier (saved by :meth:`Predictor.save`, ``fewshot adapt --save`` or
    downloaded from ``fewshot app``) loads as the :class:`Predictor` it was, with its classes:
    call ``.predict`` on it directly (:mod:`fewshot.inference.adapted`).

    Nothing in the file can run code (see :mod:`fewshot.checkpoints`).

    Raises:
        CheckpointError: missing, corrupt, unsafe, or not a fewshot model; the message names it.
    """
    from fewshot.inference.adapted import is_adapted_classifier, read_adapted

    if is_adapted_classifier(path):
        return read_adapted(path, device)
    return Learner(read_model(path), device)


@dataclass(frozen=True)
class Predictions:
    """Class probabilities of ``B`` images over a task's ``N`` classes.

    Attributes:
        images: a name per image (its path, else ``image[i]``).
        classes: the task's classes, in the column order of ``probabilities``.
        probabilities: ``[B, N]`` float tensor; rows sum to 1.
        batching: how batch norm treated the images, in words (see :meth:`Predictor.predict`).
    """

    images: list[str]
    classes: list[Hashable]
    probabilities: Tensor
    batching: str

    @property
    def labels(self) -> list[Hashable]:
        """The most probable class of every image."""
        return [self.classes[i] for i in self.probabilities.argmax(dim=1).tolist()]

    @property
    def confidences(self) -> list[float]:
        """The probability of every image's predicted class."""
        return self.probabilities.max(dim=1).values.tolist()

    def top_k(self, k: int = 3) -> list[list[tuple[Hashable, float]]]:
        """For every image, its ``min(k, N)`` most probable classes with their probabilities."""
        values, indices = self.probabilities.topk(min(k, len(self.classes)), dim=1)
        return [[(self.classes[i], p) for i, p in zip(row_i, row_p, strict=True)]
                for row_i, row_p in zip(indices.tolist(), values.tolist(), strict=True)]

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class Predictor:
    """A model adapted to one task; predicts any number of images of that task's classes.

    Made by :meth:`Learner.adapt`. ``classes`` are the task's classes (the order of the
    probabilities), ``steps`` and ``lr`` the inner loop it was adapted with (``lr`` is None
    for learned per-step rates), ``head_reset`` whether the head started from zeros,
    ``support_labels`` the class of every support image and ``model_metadata`` the export
    metadata of the model it was adapted from (both for :meth:`save`).
    """

    model: AdaptableModel
    adapted: Adapted
    classes: list[Hashable]
    support_x: Tensor
    preprocessing: Preprocessing
    batch_dependent: bool
    steps: int
    lr: float | None
    head_reset: bool
    support_labels: list[Hashable] = field(default_factory=list)
    model_metadata: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write this adapted classifier (weights, adapted weights, class names) as one
        ``.safetensors`` file, or as ``DIR/classifier.safetensors`` plus a short README when
        ``path`` is a folder; :func:`load` reads it back and predicts identically."""
        from fewshot.inference.adapted import save_adapted

        return save_adapted(self, path)

    def predict(self, images: ImageInput | Sequence[ImageInput],
                one_at_a_time: bool = False) -> Predictions:
        """Class probabilities of ``images`` (paths, PIL images or tensors; see :mod:`fewshot.images`).

        With transductive batch norm (the MAML default) an image's prediction depends on the
        images normalised with it. By default all ``images`` form one batch, as the query set
        did in meta-training and evaluation. ``one_at_a_time=True`` predicts every image on its
        own, normalised together with the support images only, so no prediction depends on
        another query image. (Normalising an image by its own statistics alone costs much more
        accuracy; see the README.) Models whose batch norm uses running statistics predict
        every image independently anyway.
        """
        x, names = self.preprocessing.prepare(images)
        x = x.to(self.support_x.device)
        if not self.batch_dependent:
            logits = self.model.predict_logits(self.adapted, x)
            batching = "running statistics: every image is predicted independently"
        elif one_at_a_time:
            # A plain loop: on CPU it beat vmap over chunks of images (1.0 s vs 1.1-2.8 s for
            # 100 queries, 5-way 5-shot), whose larger batches fall out of cache.
            logits = torch.stack([self._with_support(image) for image in x])
            batching = (f"transductive, one image at a time: each image was normalised together "
                        f"with the {len(self.support_x)} support images, independently of the "
                        "other images")
        else:
            logits = self.model.predict_logits(self.adapted, x)
            batching = (f"transductive: the {len(x)} image(s) were normalised together as one "
                        "batch, so each prediction depends on the others (one-at-a-time "
                        "prediction avoids this)")
        probabilities = logits.float().softmax(dim=1).cpu()
        return Predictions(names, list(self.classes), probabilities, batching)

    def _with_support(self, image: Tensor) -> Tensor:
        """Logits ``[N]`` of one image normalised in a batch with the support images."""
        batch = torch.cat([self.support_x, image[None]])
        return self.model.predict_logits(self.adapted, batch)[-1]


class Learner:
    """A meta-trained model, ready to adapt to new tasks; see :func:`load`.

    Attributes:
        metadata: everything needed to rebuild the model (the export JSON, see
            :mod:`fewshot.export`).
        preprocessing: how images are prepared for the model.
    """

    def __init__(self, model: ModelFiles, device: str | torch.device = "cpu") -> None:
        self.model_files, self.metadata = model, model.metadata
        try:
            self.preprocessing = Preprocessing.from_dict(model.metadata["preprocessing"])
        except ValueError as error:
            raise CheckpointError(f"{model.source}: {error}") from error
        self.device = torch.device(device)
        self._models: dict[tuple[int, bool], AdaptableModel] = {}
        trained = self._meta_learner(self.ways, reset_head=False)  # checks the weights now
        self.batch_dependent = _predictions_depend_on_batch(trained, self.preprocessing)

    @property
    def ways(self) -> int:
        """N of the trained head."""
        return int(self.metadata["ways"])

    @property
    def steps(self) -> int:
        """Adaptation steps by default (the model's evaluation inner loop)."""
        return self._meta_learner(self.ways, False).algorithm.evaluation_steps

    @property
    def lr(self) -> float | None:
        """Adaptation learning rate by default; None where the model learned its rates
        (MAML++ LSLR: one per parameter tensor and step; Meta-SGD: one per entry; part of
        the weights)."""
        return self._meta_learner(self.ways, False).algorithm.evaluation_lr

    def adapt(self, images: ImageInput | Sequence[ImageInput], labels: Sequence[Hashable],
              steps: int | None = None, lr: float | None = None,
              reset_head: bool | None = None) -> Predictor:
        """Adapt to the task whose support set is ``images`` labelled ``labels``.

        Args:
            images: support images (paths, PIL images or tensors), any number per class.
            labels: a class (any hashable: a name, a number) per image; N >= 2 classes.
            steps, lr: the inner loop (default: as the model was evaluated, :attr:`steps`,
                :attr:`lr`; a given ``lr`` replaces learned rates).
            reset_head: start from a zero-initialised head; default: only when N differs from
                the trained :attr:`ways`, which requires it.

        Returns:
            A :class:`Predictor` whose classes are in order of first appearance in ``labels``.
        """
        x, names = self.preprocessing.prepare(images)
        labels = list(labels)
        if len(labels) != len(x):
            raise ImageError(f"{len(x)} support images but {len(labels)} labels; give one label per image")
        classes: list[Hashable] = []
        for index, label in enumerate(labels):
            if not isinstance(label, Hashable):
                raise ImageError(f"label {index} ({label!r}, of {names[index]}) is not hashable")
            if label not in classes:
                classes.append(label)
        if len(classes) < 2:
            raise ImageError(f"a task needs at least 2 classes; all {len(x)} support images are "
                             f"labelled {classes[0]!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
        if lr is not None and not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr must be a number >= 0, got {lr!r}")
        uses_head = self._meta_learner(self.ways, False).algorithm.uses_head
        if not uses_head:  # prototypes: there is no head to reset
            reset_head = False
        if reset_head is None:
            reset_head = uses_head and len(classes) != self.ways
        steps = self.steps if steps is None else steps
        lr = self.lr if lr is None else lr
        if reset_head and steps == 0:
            raise ValueError("a zero-initialised head predicts nothing without adaptation; "
                             "use steps >= 1")
        model = self._meta_learner(len(classes) if uses_head else self.ways, reset_head)
        y = torch.tensor([classes.index(label) for label in labels], device=self.device)
        support_x = x.to(self.device)
        adapted = model.adapt(support_x, y, steps=steps, lr=lr)
        return Predictor(model, adapted, classes, support_x, self.preprocessing,
                         self.batch_dependent, adapted.steps_taken, lr, reset_head,
                         labels, self.metadata)

    def save(self, directory: str | Path, note: str | None = None) -> Path:
        """Write this model as an export folder (safetensors + JSON + model card) that
        :func:`load` reads; ``note`` says how it was trained, in the card."""
        return write_export(self.model_files, directory, note=note)

    def _meta_learner(self, ways: int, reset_head: bool) -> AdaptableModel:
        key = (ways, reset_head)
        if key not in self._models:
            self._models[key] = build_model(self.model_files, ways, reset_head).to(self.device)
        return self._models[key]


def _predictions_depend_on_batch(model: AdaptableModel, preprocessing: Preprocessing) -> bool:
    """Whether the model normalises with batch statistics, found by trying it.

    Asking the model rather than listing layer types keeps this right for any normalisation a
    model may use: two images predicted together must match the two predicted alone.
    """
    side, generator = preprocessing.image_size, torch.Generator().manual_seed(0)
    x = torch.rand(2, preprocessing.channels, side, side, generator=generator).to(model.device)
    unadapted = Adapted(dict(model.network.named_parameters()), model.algorithm.evaluation_steps)
    if not model.algorithm.uses_head:  # prototypes: adapt to the two images as two classes
        labels = torch.arange(2, device=x.device)
        unadapted = model.adapt(x, labels)
    together = model.predict_logits(unadapted, x)
    alone = torch.cat([model.predict_logits(unadapted, x[:1]), model.predict_logits(unadapted, x[1:])])
    return not torch.allclose(together, alone, rtol=1e-4, atol=1e-5)
