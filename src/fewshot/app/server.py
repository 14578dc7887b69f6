"""The page's HTTP server: the standard library's ThreadingHTTPServer and a JSON API.

    GET    /                          the page (static/index.html; app.js, app.css beside it)
    GET    /api/state                 the model, the classes, the queries, the limits
    POST   /api/classes               {"name": ...} -> a new class
    PATCH  /api/classes/<id>          {"name": ...} renames it
    DELETE /api/classes/<id>          deletes it and its images
    POST   /api/classes/<id>/images   the file as the body (X-File-Name: its URL-encoded name)
    POST   /api/queries               a query image, likewise
    DELETE /api/queries               deletes every query image
    GET    /api/images/<id>           an image (thumbnails)
    DELETE /api/images/<id>           deletes one image
    POST   /api/adapt                 {"one_at_a_time": bool} -> adapts, predicts the queries
    POST   /api/predict               {"one_at_a_time": bool} -> predicts the queries
    GET    /api/classifier            the adapted classifier, as a file to download

Every error is a JSON ``{"error": message}`` with a 4xx status; anything unexpected is a 500
whose traceback goes to the server's log, never to the page, and the server keeps serving.
Requests that change something must carry ``X-Requested-With: fewshot-app`` (a header a
cross-site form cannot send), and, bound to loopback, the Host must be a loopback name (so a
web page cannot reach the server through DNS rebinding).
"""

from __future__ import annotations

import json
import sys
import tempfile
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from fewshot.app.session import Session
from fewshot.app.workspace import FORMATS, ID_PATTERN, WorkspaceError, too_large

STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/app.css": ("app.css", "text/css; charset=utf-8")}
IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "BMP": "image/bmp",
               "WEBP": "image/webp", "TIFF": "image/tiff"}
assert set(IMAGE_TYPES) == set(FORMATS)
MAX_JSON_BYTES = 64_000
DISCARD_LIMIT = 1 << 30  # an over-limit body is read (and dropped) up to this, so the browser
# receives the 413 instead of a reset connection; beyond it, the connection is closed.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
CLASSIFIER_FILE = "fewshot-classifier.safetensors"


class AppServer(ThreadingHTTPServer):
    """Serves the page and its API for ``session``; ``quiet`` keeps request lines out of the log."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], session: Session, quiet: bool = True) -> None:
        super().__init__(address, RequestHandler)
        self.session, self.quiet = session, quiet
        self.loopback = address[0] in ("127.0.0.1", "localhost", "::1")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class RequestHandler(BaseHTTPRequestHandler):
    server: AppServer
    server_version = "fewshot-app"

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)

    def _handle(self, method: str) -> None:
        try:
            self._check_origin(method)
            self._route(method, urlsplit(self.path).path)
        except WorkspaceError as error:
            self._send_json({"error": str(error)}, error.status)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the browser went away; nothing to answer
        except Exception as error:  # a bug: keep serving, report it in one line
            traceback.print_exc(file=sys.stderr)
            self._send_json({"error": f"internal error ({type(error).__name__}: {error}); the "
                                      "server log has the details"}, 500)

    def _check_origin(self, method: str) -> None:
        if self.server.loopback:
            host = (self.headers.get("Host") or "").rpartition(":")[0] or self.headers.get("Host")
            if host not in LOOPBACK_HOSTS:
                raise WorkspaceError(f"this server answers only to 127.0.0.1 or localhost, not "
                                     f"{host!r}", 403)
        if method != "GET" and self.headers.get("X-Requested-With") != "fewshot-app":
            raise WorkspaceError("requests that change something must come from the page "
                                 "(X-Requested-With: fewshot-app)", 403)

    def _route(self, method: str, path: str) -> None:
        session, workspace = self.server.session, self.server.session.workspace
        parts = [p for p in path.split("/") if p]
        if method == "GET" and path in STATIC:
            return self._send_static(*STATIC[path])
        if parts[:1] != ["api"]:
            raise WorkspaceError(f"no page {path!r}", 404)
        route, ids = _pattern(parts[1:])
        if route == "state" and method == "GET":
            return self._send_json(self._state())
        if route == "classes" and method == "POST":
            image_class = workspace.add_class(self._read_json().get("name"))
            return self._send_json({"id": image_class.id, "name": image_class.name}, 201)
        if route == "classes/ID" and method == "PATCH":
            image_class = workspace.rename_class(ids[0], self._read_json().get("name"))
            return self._send_json({"id": image_class.id, "name": image_class.name})
        if route == "classes/ID" and method == "DELETE":
            workspace.delete_class(ids[0])
            return self._send_json({"deleted": ids[0]})
        if route in ("classes/ID/images", "queries") and method == "POST":
            name = unquote(self.headers.get("X-File-Name") or "")
            data = self._read_body(workspace.max_upload_bytes, name)
            image = workspace.add_image(ids[0] if ids else None, name, data)
            return self._send_json({"id": image.id, "name": image.name}, 201)
        if route == "queries" and method == "DELETE":
            workspace.clear_queries()
            return self._send_json({"deleted": "queries"})
        if route == "images/ID" and method == "GET":
            image = workspace.image(ids[0])
            return self._send(image.path.read_bytes(), IMAGE_TYPES[image.format])
        if route == "images/ID" and method == "DELETE":
            workspace.delete_image(ids[0])
            return self._send_json({"deleted": ids[0]})
        if route in ("adapt", "predict") and method == "POST":
            one_at_a_time = bool(self._read_json().get("one_at_a_time", False))
            adapted = session.adapt() if route == "adapt" else session.adapted_state()
            return self._send_json({"adapted": adapted, **session.predict(one_at_a_time)})
        if route == "classifier" and method == "GET":
            return self._send_classifier()
        if route is None:
            raise WorkspaceError(f"no API {path!r}", 404)
        raise WorkspaceError(f"{method} is not allowed on {path}", 405)

    def _state(self) -> dict[str, Any]:
        session, workspace = self.server.session, self.server.session.workspace
        return {"model": session.describe_model(), **workspace.snapshot(),
                "adapted": session.adapted_state(),
                "limits": {"max_upload_bytes": workspace.max_upload_bytes,
                           "max_images": workspace.max_images}}

    def _send_classifier(self) -> None:
        session = self.server.session
        with tempfile.TemporaryDirectory(dir=session.workspace.folder) as folder:
            data = session.save_classifier(Path(folder) / CLASSIFIER_FILE).read_bytes()
        self._send(data, "application/octet-stream",
                   {"Content-Disposition": f'attachment; filename="{CLASSIFIER_FILE}"'})

    def _read_body(self, limit: int, name: str) -> bytes:
        length_header = self.headers.get("Content-Length")
        if length_header is None or not length_header.isdigit():
            raise WorkspaceError("the request has no Content-Length", 411)
        length = int(length_header)
        if length > limit:
            self._discard(length)
            raise too_large(name or "the file", length, limit)
        return self.rfile.read(length)

    def _discard(self, length: int) -> None:
        if length > DISCARD_LIMIT:
            self.close_connection = True
            return
        while length > 0:
            chunk = self.rfile.read(min(length, 1 << 20))
            if not chunk:
                break
            length -= len(chunk)

    def _read_json(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_JSON_BYTES:
            self._discard(length)
            raise WorkspaceError(f"a JSON request has at most {MAX_JSON_BYTES} bytes", 413)
        body = self.rfile.read(length) if length else b"{}"
        try:
            value = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise WorkspaceError(f"the request is not JSON ({error})") from error
        if not isinstance(value, dict):
            raise WorkspaceError("the request must be a JSON object")
        return value

    def _send_static(self, name: str, content_type: str) -> None:
        data = resources.files("fewshot.app").joinpath("static", name).read_bytes()
        self._send(data, content_type)

    def _send_json(self, value: Any, status: int = 200) -> None:
        self._send(json.dumps(value).encode(), "application/json", status=status)

    def _send(self, data: bytes, content_type: str, headers: dict[str, str] | None = None,
              status: int = 200) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        # The page loads only its own files: nothing from the internet, no inline scripts.
        self.send_header("Content-Security-Policy",
                         "default-src 'self'; img-src 'self' blob: data:; object-src 'none'")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


def _pattern(parts: list[str]) -> tuple[str | None, list[str]]:
    """``["classes", "0123abcd..."]`` -> ``("classes/ID", ["0123abcd..."])``; None for an id
    that is not one of ours (nothing from the path is ever used as a file name)."""
    ids = [p for p in parts if ID_PATTERN.fullmatch(p)]
    shape = "/".join("ID" if ID_PATTERN.fullmatch(p) else p for p in parts)
    known = {"state", "classes", "classes/ID", "classes/ID/images", "queries", "images/ID",
             "adapt", "predict", "classifier"}
    return (shape if shape in known else None), ids
