"""The original project's entry point, kept for its users' commands and scripts.

    python training/run_experiment.py --gpus=-1 --wandb --data_class=MiniImagenet \
        --model_class=ResNetClassifier --num_workers=6 --accelerator=ddp \
        --val_check_interval=5 --batch_size=3 --inner_loop_steps=1 --support_samples=5 \
        --track_grad_norm=2

is ``fewshot fit --test_after_fit=true`` with the same flags: meta-train, then score the test
episodes with the best checkpoint, as the original did. The flags are translated by
:mod:`fewshot.training.original_flags` (README, "The original project's command line"); every
fewshot option works here too. A first argument ``fit``, ``validate`` or ``test`` runs that
subcommand instead.
"""

import sys

from fewshot.cli import main

if __name__ == "__main__":
    arguments = sys.argv[1:]
    if arguments[:1] in (["fit"], ["validate"], ["test"]):
        main(arguments)
    elif arguments[:1] in (["-h"], ["--help"]):
        main(["fit", *arguments])
    else:
        main(["fit", "--test_after_fit=true", *arguments])
