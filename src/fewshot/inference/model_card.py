"""The ``README.md`` every export carries: what the model is, how well it did, how to use it.

Written from the export's own metadata (:mod:`fewshot.inference.export`), so the card can
never disagree with the weights beside it.
"""

from __future__ import annotations

from typing import Any

CARD_FILE = "README.md"


def _class_name(settings: dict[str, Any] | str | None) -> str:
    if isinstance(settings, dict):
        settings = settings.get("class_path", "?")
    return str(settings).rpartition(".")[2]


def _arguments(settings: dict[str, Any] | None) -> str:
    init_args = (settings or {}).get("init_args") or {}
    shown = [f"{k}={v}" for k, v in init_args.items() if not isinstance(v, (dict, list))]
    return ", ".join(shown)


def _accuracy(test: dict[str, Any] | None) -> str:
    if not test:
        return "not recorded (export from the run folder after `fewshot test` to include it)"
    return (f"{100 * test['accuracy']:.2f} +- {100 * test['ci95']:.2f}% (95% interval) over "
            f"{test['episodes']} test episodes, after {test.get('inner_steps', '?')} inner step(s)")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded (the run had no time limit)"
    minutes = seconds / 60
    return f"{minutes:.1f} minutes" if minutes < 120 else f"{minutes / 60:.1f} hours"


def model_card(metadata: dict[str, Any], name: str | None = None) -> str:
    """The Markdown card of an export with ``metadata`` (its ``fewshot.json``)."""
    source = metadata.get("source") or {}
    preprocessing = metadata.get("preprocessing") or {}
    ways, shots = metadata.get("ways"), source.get("shots")
    title = name or f"{source.get('dataset') or 'fewshot'} {ways}-way {shots or '?'}-shot model"
    channels = preprocessing.get("channels")
    colour = "grayscale" if channels == 1 else "RGB" if channels == 3 else f"{channels} channels"
    rows = [
        ("dataset", f"{source.get('dataset') or 'not recorded'} (class split: "
                    f"{source.get('class_split') or 'the dataset standard'}; data seed "
                    f"{source.get('data_seed', 'not recorded')})"),
        ("tasks", f"{ways}-way {shots or '?'}-shot (it adapts to any number of classes)"),
        ("algorithm", f"{_class_name(metadata.get('algorithm'))} "
                      f"({_arguments(metadata.get('algorithm'))})"),
        ("inner optimizer", _class_name(metadata.get("inner_optimizer"))),
        ("backbone", f"{_class_name(metadata.get('backbone'))} "
                     f"({_arguments(metadata.get('backbone'))})"),
        ("images", f"{preprocessing.get('image_size')}x{preprocessing.get('image_size')} "
                   f"{colour}, resized by {preprocessing.get('resize', 'squash')}"
                   f"{', inverted' if preprocessing.get('invert') else ''}"),
        ("test accuracy", _accuracy(source.get("test"))),
        ("training", f"{source.get('global_step', '?')} meta-iterations, "
                     f"{_duration(source.get('training_seconds'))}"),
        ("made with", f"fewshot {metadata.get('fewshot_version', '?')}, torch "
                      f"{(source.get('versions') or {}).get('torch', '?')}"),
        ("weights", f"`model.safetensors`, SHA-256 {metadata.get('weights_sha256', '?')}"),
        ("from", f"`{source.get('checkpoint', '?')}` (SHA-256 "
                 f"{source.get('checkpoint_sha256') or 'not recorded'})"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    note = f"\n{metadata['note']}\n" if metadata.get("note") else ""
    return f"""# {title}

A few-shot image classifier meta-trained with [fewshot](https://pypi.org/project/fewshot/):
give it a handful of labelled images of new classes and it adapts to them in a fraction of a
second, then classifies new images of those classes.
{note}
| | |
|---|---|
{table}

## Use it

```bash
fewshot adapt --checkpoint THIS_FOLDER --support my_task/ --query new_images/
```

`my_task/` holds one folder of images per class (the folder name is the class name).

```python
import fewshot

learner = fewshot.load("THIS_FOLDER")
predictor = learner.adapt(support_images, support_labels)  # paths or PIL images, class names
print(predictor.predict(query_images).labels)
```

Files: `model.safetensors` (the weights; no pickle, nothing in it can run code) and
`fewshot.json` (how to rebuild the model, and where it came from).
"""
