"""The app's HTTP API without a browser: the page's files, uploads and their limits, paths that
try to leave the uploads folder, JSON errors for every mistake, and a server that keeps
serving after each of them (even after a bug)."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import pytest
import torch
from browser_page import running_app
from test_workspace import png

import fewshot

HEADERS = {"X-Requested-With": "fewshot-app"}


class Client:
    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, body: bytes | dict | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict | bytes, dict]:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(self.url + path.lstrip("/"), data=data, method=method,
                                         headers={**HEADERS, **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, raw, response_headers = response.status, response.read(), response.headers
        except urllib.error.HTTPError as error:
            status, raw, response_headers = error.code, error.read(), error.headers
        if response_headers.get("Content-Type") == "application/json":
            return status, json.loads(raw), dict(response_headers)
        return status, raw, dict(response_headers)

    def upload(self, path: str, name: str, data: bytes) -> tuple[int, dict]:
        status, value, _ = self.call("POST", path, data, {"X-File-Name": name})
        return status, value


@pytest.fixture
def app():
    with running_app(max_upload_bytes=50_000, max_images=100) as server:
        yield server, Client(server.url)


def test_the_page_and_its_files_are_served_and_fetch_nothing_from_elsewhere(app):
    server, client = app
    for path, kind in (("/", "text/html"), ("/app.js", "text/javascript"), ("/app.css", "text/css")):
        status, body, headers = client.call("GET", path)
        assert status == 200 and headers["Content-Type"].startswith(kind)
        assert headers["Content-Security-Policy"].startswith("default-src 'self'")
        text = body.decode()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
    assert len(list(resources.files("fewshot.app").joinpath("static").iterdir())) == 3


@pytest.mark.parametrize("path", ["/api/../../etc/passwd", "/../server.py", "/static/../cli.py",
                                  "/api/images/..%2F..%2Fetc%2Fpasswd", "/api/images/0123",
                                  "/api/images/ffffffffffffffff", "/index.html", "/api/nothing"])
def test_paths_outside_the_api_are_not_found(app, path):
    _, client = app
    status, body, _ = client.call("GET", path)
    assert status == 404 and "error" in body


def test_requests_from_elsewhere_are_refused(app):
    server, client = app
    status, body, _ = client.call("POST", "/api/classes", {}, {"X-Requested-With": "a form"})
    assert status == 403 and "must come from the page" in body["error"]
    status, body, _ = client.call("GET", "/api/state", headers={"Host": "attacker.example:80"})
    assert status == 403 and "not 'attacker.example'" in body["error"]
    assert client.call("GET", "/api/state", headers={"Host": f"localhost:{server.server_port}"})[0] == 200


def test_every_mistake_is_a_json_error_and_the_server_keeps_serving(app):
    server, client = app
    cases = [
        (("POST", "/api/classes", b"{not json", {"Content-Type": "application/json"}), 400, "not JSON"),
        (("POST", "/api/classes", b"[1, 2]", {}), 400, "must be a JSON object"),
        (("POST", "/api/classes", b" " * 70_000, {}), 413, "at most 64000 bytes"),
        (("PATCH", "/api/state", b"{}", {}), 405, "PATCH is not allowed on /api/state"),
        (("DELETE", "/api/classes/ffffffffffffffff", None, {}), 404, "no class"),
        (("POST", "/api/adapt", b"{}", {}), 409, "at least 2 classes"),
        (("POST", "/api/predict", b"{}", {}), 409, "nothing adapted yet"),
        (("GET", "/api/classifier", None, {}), 409, "nothing adapted yet"),
    ]
    for (method, path, body, headers), status, message in cases:
        got, value, _ = client.call(method, path, body, headers)
        assert (got, message in value["error"]) == (status, True), (path, value)
    # A 100 MB body over the limit is answered with 413, not a reset connection, and not kept.
    status, value = client.upload("/api/queries", "big.png", b"\x89PNG" + bytes(100_000_000))
    assert status == 413 and value["error"].startswith("big.png is 100.0 MB; the limit is 50.0 kB")
    with socket.create_connection(server.server_address) as raw:  # no Content-Length at all
        raw.sendall(b"POST /api/queries HTTP/1.0\r\nHost: 127.0.0.1\r\n"
                    b"X-Requested-With: fewshot-app\r\n\r\n")
        assert raw.recv(200).startswith(b"HTTP/1.0 411")
    # A bug: answered 500 in one line, never a traceback, and the next request is served.
    session = server.session
    session.describe_model = lambda: 1 / 0
    status, value, _ = client.call("GET", "/api/state")
    assert status == 500 and value["error"].startswith("internal error (ZeroDivisionError")
    assert "Traceback" not in value["error"]
    del session.describe_model
    assert client.call("GET", "/api/state")[0] == 200
    assert list(session.workspace.folder.iterdir()) == []


def test_a_task_through_the_api_and_its_download(app):
    server, client = app
    ids = []
    for name in ("ring", "bar"):
        status, value, _ = client.call("POST", "/api/classes", {"name": name})
        assert status == 201
        ids.append(value["id"])
    for index, class_id in enumerate(ids):
        for shot in range(2):
            assert client.upload(f"/api/classes/{class_id}/images", f"{shot}.png",
                                 png(10 * index + shot))[0] == 201
    # Many uploads at once, from several threads: every one is kept.
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: client.upload("/api/queries", f"q{i}.png", png(100 + i)),
                                range(20)))
    assert [status for status, _ in results] == [201] * 20
    status, value, _ = client.call("POST", "/api/adapt", {"one_at_a_time": False})
    assert status == 200 and value["adapted"]["classes"] == [{"name": "ring", "images": 2},
                                                             {"name": "bar", "images": 2}]
    assert len(value["predictions"]) == 20 and value["batching"].startswith("transductive")
    first = value["predictions"][0]
    assert first["label"] in ("ring", "bar") and first["top"][0]["class"] == first["label"]
    status, data, headers = client.call("GET", "/api/classifier")
    assert headers["Content-Disposition"] == 'attachment; filename="fewshot-classifier.safetensors"'
    download = server.session.workspace.folder.parent / "downloaded.safetensors"
    download.write_bytes(data)
    classifier = fewshot.load(download)
    queries = [server.session.workspace.image(p["id"]).path for p in value["predictions"]]
    assert torch.equal(classifier.predict(queries).probabilities,
                       server.session.predictor.predict(queries).probabilities)
    assert classifier.predict(queries).confidences == [p["probability"] for p in value["predictions"]]
    # Thumbnails are the uploaded files; one at a time predicts each with the support only.
    status, body, headers = client.call("GET", f"/api/images/{first['id']}")
    assert status == 200 and headers["Content-Type"] == "image/png" and body == png(100 + int(first["name"][1:-4]))
    status, alone, _ = client.call("POST", "/api/predict", {"one_at_a_time": True})
    assert alone["batching"].startswith("transductive, one image at a time")
    # A class changed: predictions wait for the next adaptation.
    client.upload(f"/api/classes/{ids[0]}/images", "more.png", png(7))
    status, value, _ = client.call("POST", "/api/predict", {})
    assert status == 409 and "press Adapt again" in value["error"]
    assert client.call("GET", "/api/state")[1]["adapted"]["stale"] is True
