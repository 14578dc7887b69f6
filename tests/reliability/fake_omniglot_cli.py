"""``python fake_omniglot_cli.py fit ...``: the real ``fewshot`` command, in a process of its own,
accepting the tests' fake Omniglot (its size comes in ``FEWSHOT_FAKE_OMNIGLOT``, as JSON).

With ``FEWSHOT_KILL_DURING_SAVE=N`` the process kills itself with SIGKILL half-way through
writing its N-th ``last.ckpt`` to disk: half of the checkpoint's bytes are in the file being
written (and synced), then the process is gone, with no chance to clean up. Where that file was
and how much of it was written goes to the JSON file ``FEWSHOT_KILL_REPORT`` first.
"""

from __future__ import annotations

import io
import json
import os
import signal

import torch

from fewshot.cli import main
from fewshot.data.omniglot import Omniglot


def kill_during_the_nth_save(n: int, report: str) -> None:
    save = torch.save
    saves_of_last = 0

    def save_and_die_half_way(obj, f, *args, **kwargs):
        nonlocal saves_of_last
        name = os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "")
        if isinstance(name, int):  # a file opened from a descriptor (os.fdopen)
            name = os.readlink(f"/proc/self/fd/{name}")
        if "last" not in os.path.basename(str(name)):
            return save(obj, f, *args, **kwargs)
        saves_of_last += 1
        if saves_of_last < n:
            return save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        with open(report, "w") as file:
            json.dump({"file": os.path.abspath(name), "written": len(data) // 2,
                       "size": len(data)}, file)
        if isinstance(f, (str, os.PathLike)):
            f = open(f, "wb")  # noqa: SIM115 (it is never closed: the process dies)
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_and_die_half_way


if __name__ == "__main__":
    fake = json.loads(os.environ["FEWSHOT_FAKE_OMNIGLOT"])
    Omniglot.expected_characters = fake["expected_characters"]
    Omniglot.maml_split_sizes = tuple(fake["maml_split_sizes"])
    if os.environ.get("FEWSHOT_KILL_DURING_SAVE"):
        kill_during_the_nth_save(int(os.environ["FEWSHOT_KILL_DURING_SAVE"]),
                                 os.environ["FEWSHOT_KILL_REPORT"])
    main()
