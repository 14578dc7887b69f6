"""Checkpoint ensembles at test time, as the MAML++ reference code scores its models.

The reference code (HowToTrainYourMAMLPytorch, ``experiment_builder.py``) keeps its best
validation checkpoints (``max_models_to_save: 5``) and at test time adapts each of the top
``top_n_models=5`` to every test task, averages the adapted models' predicted class
probabilities per query image, and scores the average. ``fewshot test --ensemble ...`` (or
``--ensemble top_k`` after a fit that kept ``--checkpoint.save_top_k K``) does the same, after
every inner step.
"""

from __future__ import annotations

import glob
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fewshot.core.episode import Episodes
from fewshot.data.download import sha256sum

if TYPE_CHECKING:
    from fewshot.training.module import MetaLearner

#: ``--ensemble top_k``: the checkpoints the run's checkpoint callback kept as its best.
TOP_K = "top_k"


def ensemble_paths(specs: Sequence[str], kept: Sequence[str | Path] = (),
                   main_checkpoint: str | Path | None = None) -> list[Path]:
    """The checkpoint files of ``--ensemble``: paths, glob patterns, or ``top_k``.

    ``top_k`` stands for ``kept`` (the best-k checkpoints of the fit that just ran) or, after a
    separate ``fewshot test --ckpt_path DIR/best-N.ckpt``, for the ``best-*.ckpt`` files beside
    it. Files are returned once each, in a stable order; a pattern that matches nothing or a
    missing file is an error naming it.
    """
    paths: list[Path] = []
    for spec in specs:
        if spec == TOP_K:
            found = [Path(p) for p in kept if p]
            if not found and main_checkpoint:
                found = sorted(Path(main_checkpoint).parent.glob("best-*.ckpt"))
            if not found:
                raise FileNotFoundError(
                    "--ensemble top_k: no best checkpoints kept by this run (fit with "
                    "--checkpoint.save_top_k K), and none named best-*.ckpt beside --ckpt_path")
        elif glob.has_magic(spec):
            found = sorted(Path(p) for p in glob.glob(spec))
            if not found:
                raise FileNotFoundError(f"--ensemble {spec}: no checkpoint matches this pattern")
        else:
            found = [Path(spec)]
            if not found[0].is_file():
                raise FileNotFoundError(f"--ensemble: checkpoint {spec} does not exist")
        paths += [p for p in found if p.resolve() not in {q.resolve() for q in paths}]
    return paths


def load_members(paths: Sequence[Path], like: MetaLearner) -> list[MetaLearner]:
    """Each checkpoint as a :class:`MetaLearner` on ``like``'s device, in evaluation mode,
    checked to score the same tasks the same way (ways and evaluation steps)."""
    if getattr(like, "regression", False):
        raise ValueError("--ensemble averages class probabilities, which a regression model "
                         "(sine waves) does not predict; test its checkpoints one at a time")
    members = []
    for path in paths:
        member = type(like).load_from_checkpoint(path, map_location=like.device,
                                                 weights_only=True)
        for what, mine, theirs in (
                ("ways", like.hparams.ways, member.hparams.ways),
                ("evaluation steps", like.algorithm.evaluation_steps,
                 member.algorithm.evaluation_steps)):
            if mine != theirs:
                raise ValueError(f"--ensemble: {path} has {what} {theirs}, the tested model "
                                 f"{mine}; an ensemble averages models of one task setting")
        # What test_results.json records of the ensemble: each member's file and its hash.
        member.source = {"checkpoint": str(path), "sha256": sha256sum(path)}
        members.append(member.eval())
    return members


def ensemble_probabilities(members: Sequence[MetaLearner], episodes: Episodes) -> Tensor:
    """``[T, steps + 1, Q, N]``: per task, the members' class probabilities of every query
    image after each inner step, averaged over the members."""
    tasks = []
    for t in range(episodes.num_tasks):
        support_x, support_y = episodes.support_x[t], episodes.support_y[t]
        query_x = episodes.query_x[t]
        tasks.append(torch.stack([
            m.algorithm.step_probabilities(m.network, dict(m.network.named_parameters()),
                                           support_x, support_y, query_x)
            for m in members]).mean(dim=0))
    return torch.stack(tasks)


def ensemble_accuracies(members: Sequence[MetaLearner], episodes: Episodes) -> Tensor:
    """``[T, steps + 1]``: the accuracy of the averaged probabilities after each step."""
    probabilities = ensemble_probabilities(members, episodes)
    predictions = probabilities.argmax(dim=-1)  # [T, S+1, Q]
    targets = episodes.query_y.unsqueeze(1)  # [T, 1, Q]
    return (predictions == targets).to(probabilities.dtype).mean(dim=-1)
