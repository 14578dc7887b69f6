"""``fewshot app`` as a user starts it: the address and what can reach it are printed, uploads
live in a temporary folder that is gone after Ctrl-C or SIGTERM, and a busy port or a model it
cannot adapt is one line of error."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from test_workspace import png

import fewshot
from fewshot.cli import main

pytestmark = pytest.mark.slow


def start(*args: str) -> tuple[subprocess.Popen, str, Path]:
    process = subprocess.Popen([sys.executable, "-m", "fewshot", "app", "--port", "0", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first, second = process.stdout.readline(), process.stdout.readline()
    address = re.search(r"at (http://127\.0\.0\.1:\d+/) \(loopback only: other machines cannot "
                        r"reach it", first)
    folder = re.search(r"Uploads are kept in (\S+) and removed at exit", second)
    assert address and folder, (first, second, process.stderr.read() if process.poll() else "")
    return process, address.group(1), Path(folder.group(1))


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_the_uploads_folder_is_removed_when_the_server_stops(stop):
    process, url, folder = start("--max-upload-mb", "0.5")
    try:
        request = urllib.request.Request(url + "api/queries", data=png(), method="POST",
                                         headers={"X-Requested-With": "fewshot-app",
                                                  "X-File-Name": "q.png"})
        assert urllib.request.urlopen(request, timeout=60).status == 201
        assert len(list(folder.iterdir())) == 1
        state = urllib.request.urlopen(url + "api/state", timeout=60).read()
        assert b'"max_upload_bytes": 500000' in state
    finally:
        process.send_signal(stop)
        assert process.wait(timeout=30) == 0, process.stderr.read()
    assert not folder.exists()
    assert "Traceback" not in process.stderr.read()


def test_a_busy_port_is_one_line_of_error(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as caught:
            main(["app", "--port", str(port)])
    assert caught.value.code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_an_adapted_classifier_cannot_be_served(tmp_path, capsys):
    learner = fewshot.load("omniglot-5way-1shot")
    images = [_write(tmp_path / "a.png", 1), _write(tmp_path / "b.png", 2)]
    saved = learner.adapt(images, ["a", "b"]).save(tmp_path / "c.safetensors")
    with pytest.raises(SystemExit):
        main(["app", "--checkpoint", str(saved)])
    assert "is an adapted classifier; the page needs the model to adapt" in capsys.readouterr().err


def _write(path: Path, seed: int) -> Path:
    path.write_bytes(png(seed))
    return path


def test_the_app_never_imports_lightning():
    # import-linter checks the imports it can see; this checks what a running app loads.
    script = ("import sys; from fewshot.app.cli import load, Session, Workspace, AppServer; "
              "learner = load('omniglot-5way-1shot'); "
              "print(sorted(m for m in sys.modules if m.startswith(('lightning', 'fewshot.training'))))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
