"""The restricted unpickler: plain data loads, anything that could run code is refused."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from fewshot.data.download import IntegrityError
from fewshot.data.safe_pickle import UnsafePickleError, load_pickle


class _Hostile:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_arrays_dicts_lists_and_bytes_round_trip(tmp_path: Path, protocol: int) -> None:
    data = {b"data": np.arange(24, dtype=np.uint8).reshape(2, 12), "labels": [3, 1],
            "names": [b"apple", "pear"], "nested": {"x": (1.5, None, True)},
            "scalar": np.float32(2.5), "big": np.zeros((3, 84, 84, 3), dtype=np.uint8)}
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    loaded = load_pickle(path)
    np.testing.assert_array_equal(loaded[b"data"], data[b"data"])
    assert loaded[b"data"].dtype == np.uint8 and loaded["big"].shape == (3, 84, 84, 3)
    assert loaded["labels"] == [3, 1] and loaded["names"] == [b"apple", "pear"]
    assert loaded["nested"] == {"x": (1.5, None, True)} and loaded["scalar"] == 2.5


def test_hostile_pickle_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(pickle.dumps({"image_data": _Hostile(marker)}, protocol=2))
    pickle.loads(pickle.dumps(_Hostile(tmp_path / "control")))  # the payload is real...
    assert (tmp_path / "control").exists()
    with pytest.raises(UnsafePickleError, match=r"mini-imagenet-cache-train\.pkl asks to load "
                                                r"(posix|os|nt)\.system"):
        load_pickle(path)
    assert not marker.exists()  # ...but load_pickle never ran it


@pytest.mark.parametrize("target", ["builtins.eval", "subprocess.Popen", "numpy.load",
                                    "builtins.getattr"])
def test_other_callables_are_refused(tmp_path: Path, target: str) -> None:
    module, name = target.rsplit(".", 1)
    payload = f"c{module}\n{name}\n(S'1'\ntR.".encode()  # protocol 0: GLOBAL, then call it
    with pytest.raises(UnsafePickleError, match=target.replace(".", r"\.")):
        load_pickle(io.BytesIO(payload), name="payload.pkl")


def test_truncated_pickle_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({"a": np.zeros(1000)})[:200])
    with pytest.raises(IntegrityError, match=r"cut\.pkl is not a readable pickle"):
        load_pickle(path)
