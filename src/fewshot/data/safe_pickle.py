"""Loading the pickles datasets are distributed as, without letting them run code.

``pickle.load`` calls whatever callable a file names, so a doctored ``.pkl`` runs arbitrary
code the moment it is opened. The distributions fewshot reads (the CIFAR-100 python archive,
mini-ImageNet's ``mini-imagenet-cache-*.pkl``) only ever hold dicts, lists, strings, numbers
and numpy arrays; :func:`load_pickle` resolves exactly the globals needed to rebuild those and
refuses any other.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import IO, Any

from fewshot.data.download import IntegrityError

__all__ = ["UnsafePickleError", "load_pickle"]

# (module, name) pairs that rebuild numpy arrays and dtypes, under the numpy 1.x
# (``numpy.core``) and 2.x (``numpy._core``) module names a file may have been written with.
# None of them can run anything but array construction.
_ALLOWED_GLOBALS = frozenset(
    [(module, name)
     for module in ("numpy.core.multiarray", "numpy._core.multiarray")
     for name in ("_reconstruct", "scalar")]
    + [(module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")]
    + [("numpy", "ndarray"), ("numpy", "dtype")]
    # Protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(str, "latin1").
    + [("_codecs", "encode")]
    + [("collections", "OrderedDict")]
)


class UnsafePickleError(IntegrityError):
    """A pickle asks for something other than plain data; it was not executed."""


class _DataOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], source: str, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.source} asks to load {module}.{name}, which is not plain data (arrays, "
            "dicts, lists, strings, numbers); refusing to unpickle it. The file may be "
            "tampered with: get it again from a source you trust."
        )


def load_pickle(source: str | Path | IO[bytes], name: str | None = None,
                encoding: str = "latin1") -> Any:
    """Unpickle a data-only pickle from a path or binary file object.

    ``encoding`` decodes Python 2 strings (the CIFAR archives were written by Python 2; latin1
    keeps bytes such as array buffers intact). ``name`` labels the file in errors. Raises
    :class:`UnsafePickleError` for any global outside numpy arrays and builtin containers, and
    :class:`IntegrityError` for a truncated or corrupt file.
    """
    label = name or str(source if isinstance(source, (str, Path)) else
                        getattr(source, "name", "<pickle stream>"))
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            return load_pickle(f, label, encoding)
    try:
        return _DataOnlyUnpickler(source, label, encoding=encoding).load()
    except UnsafePickleError:
        raise
    # A damaged length field asks for more bytes than exist (OverflowError, or MemoryError
    # for the allocation, which fails at once); found by tests/reliability/test_fuzzed_readers.
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OverflowError, MemoryError, RecursionError) as exc:
        raise IntegrityError(f"{label} is not a readable pickle ({type(exc).__name__}: {exc}); "
                             "it may be truncated or corrupt") from exc
