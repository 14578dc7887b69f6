"""fewshot: few-shot image classification with the MAML family of meta-learners."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fewshot.inference.learner import load

__version__ = "0.1.0"
__all__ = ["load"]


def __getattr__(name: str) -> Any:
    # fewshot.load pulls in torch (never Lightning); importing it lazily keeps
    # `import fewshot.data...` (e.g. in DataLoader workers) as light as before.
    if name == "load":
        from fewshot.inference.learner import load

        return load
    raise AttributeError(f"module 'fewshot' has no attribute {name!r}")
