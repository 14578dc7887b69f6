"""Fixtures of the reliability tests: the fake Omniglot for ``fewshot`` processes, and two
uninterrupted runs with the same command line, which the killed-and-resumed runs must
reproduce bit for bit and which must reproduce each other."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cli_runs import FakeOmniglot, finish, start


@pytest.fixture(scope="session")
def fake_cli(_shared_fake_root: tuple[Path, dict[str, int]],
             tmp_path_factory: pytest.TempPathFactory) -> FakeOmniglot:
    root, counts = _shared_fake_root
    return FakeOmniglot(root, tmp_path_factory.mktemp("cli-cache"), counts, (15, 5, 5))


@pytest.fixture(scope="session")
def uninterrupted_runs(fake_cli: FakeOmniglot, tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[Callable[[], tuple[Path, Path]]]:
    """Starts two ``fewshot fit`` processes side by side; calling the result waits for both and
    gives their run folders (``default_root_dir``)."""
    started = [start(fake_cli, tmp_path_factory.mktemp("uninterrupted-run")) for _ in range(2)]
    folders: list[Path] = []

    def wait() -> tuple[Path, Path]:
        if not folders:
            for process, stderr_path in started:
                finished = finish(process, stderr_path)
                assert finished.returncode == 0, finished.stderr
                folders.append(stderr_path.parent)
        return folders[0], folders[1]

    yield wait
    for process, _ in started:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.fixture(scope="session", autouse=True)
def _start_uninterrupted_runs_early(request: pytest.FixtureRequest) -> None:
    # Seconds of training each: they run alongside the other tests of this folder.
    if any("uninterrupted_runs" in getattr(item, "fixturenames", ())
           for item in request.session.items):
        request.getfixturevalue("uninterrupted_runs")
