"""A real HTTP server on 127.0.0.1 serving files from memory, with the failures downloads meet.

``serve({"name": bytes})`` yields a :class:`Server`; its ``base`` URL goes where the mirror's
would. Per file, it can cut the connection after some bytes (once), answer with an error
status, or ignore Range requests; it records every request's path and Range header.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Server:
    files: dict[str, bytes]
    base: str = ""
    cut_after: dict[str, int] = field(default_factory=dict)  # name -> bytes sent, then close (once)
    status: dict[str, int] = field(default_factory=dict)     # name -> error status to answer
    ignore_range: bool = False
    requests: list[tuple[str, str | None]] = field(default_factory=list)


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            name = self.path.rsplit("/", 1)[-1]
            server.requests.append((name, self.headers.get("Range")))
            if name in server.status:
                self.send_error(server.status[name])
                return
            if name not in server.files:
                self.send_error(404)
                return
            data = server.files[name]
            first = 0
            range_header = self.headers.get("Range")
            if range_header and not server.ignore_range:
                first = int(range_header.removeprefix("bytes=").split("-")[0])
                if first >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {first}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[first:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            cut = server.cut_after.pop(name, None)
            if cut is not None:  # announce everything, send part of it, hang up
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def serve(files: dict[str, bytes]) -> Iterator[Server]:
    state = Server(dict(files))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.base = f"http://127.0.0.1:{httpd.server_address[1]}/record/files"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
