"""fewshot: few-shot image classification with the MAML family of meta-learners."""

__version__ = "0.1.0"
