"""The ``fewshot`` command: hands each subcommand to its layer.

``fit``, ``validate`` and ``test`` go to the training shell (LightningCLI,
:mod:`fewshot.training.cli`); ``adapt`` and ``export`` use a trained model and never import
Lightning (:mod:`fewshot.inference.cli`); ``report`` draws a run's figures.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

OVERVIEW = """usage: fewshot SUBCOMMAND [options]

Few-shot image classification with MAML, first-order MAML and MAML++.

meta-training and evaluation (LightningCLI; shipped configs by name or any YAML file):
  fit        meta-train:          fewshot fit -c omniglot_5way_1shot_cpu
  configs    list the shipped configs, one line each
  validate   score validation episodes of a checkpoint
  test       score the test episodes (600 by default) with a 95% confidence interval

using a trained model:
  adapt      adapt to your own support images and classify query images
  predict    the same as adapt (support and query folders in, predictions out)
  export     write a checkpoint as safetensors + JSON, to share without a pickle
  app        a local web page: teach the model new classes from a few images, see predictions

several runs:
  seeds      run a config over several seeds:  fewshot seeds -c CONFIG --seeds 0 1 2
  summary    mean and standard deviation of the test accuracy over finished runs

looking at runs:
  report     draw PNG figures and a summary from a run folder; with several, compare them

fewshot SUBCOMMAND --help lists every option of a subcommand."""


def _exit_on_user_error(run, user_errors: tuple[type[BaseException], ...], describe=str) -> None:
    """Run ``run()``; a user error ends with one line on stderr and exit code 2
    (``FEWSHOT_DEBUG=1`` shows the traceback instead)."""
    try:
        run()
    except user_errors as error:
        if os.environ.get("FEWSHOT_DEBUG"):
            raise
        print(f"fewshot: error: {describe(error)}", file=sys.stderr)
        sys.exit(2)


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``fewshot`` console script.

    ``fit``, ``validate`` and ``test`` go to LightningCLI (:mod:`fewshot.training.cli`);
    ``adapt`` and ``export`` (use a trained model, no Lightning) to :mod:`fewshot.inference.cli`.
    User errors (missing data or checkpoint, impossible task sizes, bad images or values,
    Trainer settings Lightning refuses) end with one message on stderr and exit code 2; set
    ``FEWSHOT_DEBUG=1`` to see the traceback instead.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(OVERVIEW)
        return
    if argv[0] == "configs":
        from fewshot.configs import config_names, describe_config

        names = config_names()
        width = max(map(len, names))
        print("Shipped configs (fewshot fit -c NAME; the files are in "
              "fewshot/configs/ inside the package):")
        for name in names:
            print(f"  {name:<{width}}  {describe_config(name)}")
        return
    if argv[0] in ("seeds", "summary"):
        from fewshot.training.seeds import seeds_main, summary_main

        chosen = seeds_main if argv[0] == "seeds" else summary_main
        _exit_on_user_error(lambda: chosen(argv[1:]), (ValueError, FileNotFoundError, RuntimeError))
    elif argv[0] == "report":
        from fewshot.training.report import main as report_main

        _exit_on_user_error(lambda: report_main(argv[1:]), (ValueError, FileNotFoundError))
    elif argv[0] in ("adapt", "predict", "export"):
        # Using a trained model needs no Trainer: plain argparse, no Lightning.
        from fewshot.inference.cli import main as inference_main

        _exit_on_user_error(lambda: inference_main(argv), (ValueError, FileNotFoundError))
    elif argv[0] == "app":
        from fewshot.app.cli import main as app_main  # no Lightning either

        _exit_on_user_error(lambda: app_main(argv[1:]), (ValueError, FileNotFoundError))
    else:
        from fewshot.training.cli import USER_ERRORS, run, user_error

        _exit_on_user_error(lambda: run(argv), USER_ERRORS, user_error)


if __name__ == "__main__":
    main()
