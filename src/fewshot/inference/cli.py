"""``fewshot adapt`` and ``fewshot export``: use a meta-trained model from the command line.

    fewshot adapt --checkpoint runs/lightning_logs/version_0 --support my_task/ --query new/
    fewshot export --checkpoint runs/lightning_logs/version_0 --output my_model/

Plain argparse rather than LightningCLI: these commands run no Trainer and have a handful of
options. ``fewshot.cli.main`` hands them here before LightningCLI sees the arguments.
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from fewshot.inference.images import IMAGE_SUFFIXES, ImageError
from fewshot.inference.learner import Predictions, Predictor, load

SUPPORT_LAYOUT = "DIR/<class name>/<images>, one folder per class"


class OutputError(ValueError):
    """The results could not be written where asked."""


def read_support_folder(directory: Path) -> tuple[list[Path], list[str]]:
    """Image paths and their class names from ``directory/<class>/<image>``, classes sorted."""
    if not directory.is_dir():
        raise ImageError(f"support folder {directory} does not exist or is not a folder "
                         f"(expected {SUPPORT_LAYOUT})")
    loose = sorted(p.name for p in directory.iterdir() if _is_image(p))
    if loose:
        raise ImageError(f"{directory} holds images directly ({loose[0]}, ...); put each class's "
                         f"images in a folder named after the class: {SUPPORT_LAYOUT}")
    class_folders = sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_folders:
        raise ImageError(f"support folder {directory} has no class folders (expected {SUPPORT_LAYOUT})")
    paths, labels = [], []
    for folder in class_folders:
        images = sorted(p for p in folder.iterdir() if _is_image(p))
        if not images:
            raise ImageError(f"class {folder.name!r} ({folder}) has no images; expected files "
                             f"ending in {', '.join(IMAGE_SUFFIXES)}")
        paths += images
        labels += [folder.name] * len(images)
    if len(class_folders) < 2:
        raise ImageError(f"a task needs at least 2 classes, but {directory} has only "
                         f"{class_folders[0].name!r}; add a folder per class")
    return paths, labels


def expand_queries(paths: Sequence[Path]) -> list[Path]:
    """Image files as given, and every image under given folders, sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if _is_image(p))
            if not images:
                raise ImageError(f"query folder {path} holds no images")
            found += images
        elif path.is_file():
            found.append(path)
        else:
            raise ImageError(f"query {path} does not exist")
    return found


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def run_adapt(args: argparse.Namespace) -> Predictions:
    learner = load(args.checkpoint, device=args.device)
    if isinstance(learner, Predictor):  # an adapted classifier: the support set is in it
        given = [f"--{n.replace('_', '-')}" for n in ("support", "steps", "lr", "reset_head")
                 if getattr(args, n) not in (None, False)]
        if given:
            raise ValueError(f"{args.checkpoint} is an adapted classifier (classes "
                             f"{', '.join(map(str, learner.classes))}); it takes no "
                             f"{', '.join(given)}: pass the model it came from to adapt again")
        predictor, labels = learner, list(learner.support_labels)
        trained_ways = learner.model_metadata.get("ways")
    else:
        if args.support is None:
            raise ValueError(f"--support is required to adapt {args.checkpoint} "
                             f"({SUPPORT_LAYOUT}); only an adapted classifier predicts without it")
        support, labels = read_support_folder(args.support)
        predictor = learner.adapt(support, labels, steps=args.steps, lr=args.lr,
                                  reset_head=True if args.reset_head else None)
        trained_ways = learner.ways
    queries = expand_queries(args.query)
    predictions = predictor.predict(queries, one_at_a_time=args.one_at_a_time)
    report = {
        "checkpoint": str(args.checkpoint if isinstance(learner, Predictor)
                          else learner.model_files.source),
        "trained_ways": trained_ways,
        "head": ("none (prototypes)" if not predictor.model.algorithm.uses_head else
                 "zero-initialised" if predictor.head_reset else "trained"),
        "classes": predictions.classes,
        "support": {name: labels.count(name) for name in predictions.classes},
        "steps": predictor.steps,
        "lr": predictor.lr,
        "batching": predictions.batching,
        "top_k": args.top_k,
        "adapted_classifier": isinstance(learner, Predictor),
    }
    _print(report, predictions, args.top_k)
    if args.output is not None:
        _write(args.output, report, predictions)
        print(f"Wrote {args.output}")
    if args.save is not None:
        print(f"Saved the adapted classifier to {predictor.save(args.save)} (fewshot predict "
              f"--checkpoint {args.save} --query ... reads it)")
    return predictions


def _print(report: dict[str, Any], predictions: Predictions, top_k: int) -> None:
    console = Console(highlight=False)
    if not console.is_terminal:  # piped or captured: whole lines, for grep and scripts
        console = Console(highlight=False, width=100_000)
    counts = ", ".join(f"{name} ({count})" for name, count in report["support"].items())
    head = ("its trained head" if report["head"] == "trained" else
            "class prototypes (no head)" if report["head"].startswith("none") else
            f"a zero-initialised {len(report['classes'])}-way head (trained for {report['trained_ways']})")
    if report["adapted_classifier"]:
        console.print(f"Model: {report['checkpoint']}, an adapted classifier (adapted when it "
                      f"was saved, from {head})")
    else:
        console.print(f"Model: {report['checkpoint']}, adapting {head}")
    console.print(f"Support: {len(report['classes'])} classes, {sum(report['support'].values())} images: {counts}")
    rate = ("none (no inner loop)" if report["steps"] == 0 else
            "learned per step" if report["lr"] is None else f"{report['lr']:g}")
    console.print(f"Adaptation: {report['steps']} step(s), learning rate {rate}")
    console.print(f"Batch norm: {report['batching']}")
    table = Table("image", "prediction", "probability", f"top {top_k}")
    for image, label, confidence, best in zip(predictions.images, predictions.labels,
                                              predictions.confidences, predictions.top_k(top_k), strict=True):
        table.add_row(image, str(label), f"{confidence:.3f}", _format_top(best))
    console.print(table)


def _format_top(best: list[tuple[Any, float]]) -> str:
    return "; ".join(f"{name} {p:.3f}" for name, p in best)


def _write(path: Path, report: dict[str, Any], predictions: Predictions) -> None:
    rows = [{"image": image, "prediction": label, "probability": confidence,
             "top_k": [{"class": c, "probability": p} for c, p in best],
             "probabilities": dict(zip(predictions.classes, row, strict=True))}
            for image, label, confidence, best, row in zip(
                predictions.images, predictions.labels, predictions.confidences,
                predictions.top_k(report["top_k"]), predictions.probabilities.tolist(), strict=True)]
    try:
        if path.suffix.lower() == ".json":
            path.write_text(json.dumps({**report, "predictions": rows}, indent=2) + "\n")
            return
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["image", "prediction", "probability", "top_k",
                             *(f"p({name})" for name in predictions.classes)])
            for row in rows:
                best = [(b["class"], b["probability"]) for b in row["top_k"]]
                writer.writerow([row["image"], row["prediction"], row["probability"],
                                 _format_top(best), *row["probabilities"].values()])
    except OSError as error:
        raise OutputError(f"cannot write {path}: {error}") from error


def run_export(args: argparse.Namespace) -> Path:
    learner = load(args.checkpoint)
    directory = learner.save(args.output, note=args.training_note)
    print(f"Exported {learner.model_files.source} to {directory}/ (model.safetensors, "
          "fewshot.json and the model card README.md)")
    return directory


def _output_path(value: str) -> Path:
    path = Path(value)
    if path.suffix.lower() not in (".csv", ".json"):
        raise argparse.ArgumentTypeError(f"{value!r} must end in .csv or .json")
    return path


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def _device(value: str) -> str:
    try:
        device = torch.device(value)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"{value!r} is not a torch device ({error})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{value!r}: this machine has no CUDA device")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fewshot", description="Use a meta-trained model.")
    commands = parser.add_subparsers(dest="command", required=True)
    checkpoint_help = ("an export folder, a run folder (lightning_logs/version_N or its parent) "
                       "or a Lightning .ckpt file")
    adapt = commands.add_parser(
        "adapt", aliases=["predict"],
        help="adapt to a new task from a folder of examples and predict new images",
        description="Adapt a meta-trained model to the classes in --support and predict --query.",
    )
    adapt.add_argument("--checkpoint", type=Path, required=True,
                       help=f"{checkpoint_help}, or an adapted classifier (saved by --save)")
    adapt.add_argument("--support", type=Path, default=None,
                       help=f"labelled examples: {SUPPORT_LAYOUT}; any number of classes and "
                            "images (required unless --checkpoint is an adapted classifier)")
    adapt.add_argument("--query", type=Path, nargs="+", required=True,
                       help="image files or folders (searched recursively) to predict")
    adapt.add_argument("--steps", type=int, default=None, help="adaptation steps (default: as trained)")
    adapt.add_argument("--lr", type=float, default=None, help="adaptation learning rate (default: as trained)")
    adapt.add_argument("--output", type=_output_path, default=None, help="also write the results to FILE.csv or FILE.json")
    adapt.add_argument("--top-k", type=_positive, default=3, help="classes listed per image (default 3)")
    adapt.add_argument("--one-at-a-time", action="store_true",
                       help="with transductive batch norm, predict each image normalised with the "
                            "support set only, not with the other queries")
    adapt.add_argument("--reset-head", action="store_true",
                       help="start from a zero-initialised head even when N matches the trained head")
    adapt.add_argument("--device", type=_device, default="cpu", help="torch device (default cpu)")
    adapt.add_argument("--save", type=Path, default=None,
                       help="also save the adapted classifier (weights and class names) to a "
                            "folder, or to FILE.safetensors; --checkpoint reads it back")
    adapt.set_defaults(run=run_adapt)
    export = commands.add_parser(
        "export", help="write a checkpoint as safetensors + JSON, to share without pickles",
        description="Write model.safetensors and fewshot.json, which `fewshot adapt` and fewshot.load read.",
    )
    export.add_argument("--checkpoint", type=Path, required=True, help=checkpoint_help)
    export.add_argument("--output", type=Path, required=True, help="folder to write")
    export.add_argument("--training-note", default=None,
                        help="how the model was trained, for its model card (README.md)")
    export.set_defaults(run=run_export)
    return parser


def main(argv: Sequence[str]) -> Predictions | Path:
    """Run ``fewshot adapt ...`` or ``fewshot export ...`` (``argv`` includes the command).

    Errors are raised for the caller (``fewshot.cli.main``) to report in one line.
    """
    args = build_parser().parse_args(list(argv))
    return args.run(args)
