"""``fewshot app``: serve the page for a model until Ctrl-C.

    fewshot app                                  # the shipped omniglot-5way-1shot model
    fewshot app --checkpoint runs/lightning_logs/version_0 --port 8765

Uploads are kept in a temporary folder of the server's own, removed when it stops (Ctrl-C or
SIGTERM). It binds to 127.0.0.1 unless ``--host`` says otherwise, and says so.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fewshot.app.server import AppServer
from fewshot.app.session import Session
from fewshot.app.workspace import Workspace
from fewshot.inference.learner import Learner, load

DEFAULT_MODEL = "omniglot-5way-1shot"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fewshot app",
        description="A local web page to teach a model new classes from a few images: make "
                    "classes, drop images into them, adapt, classify new images, download the "
                    "adapted classifier.")
    parser.add_argument("--checkpoint", default=DEFAULT_MODEL,
                        help="the model: a shipped model's name, an export folder, a run folder or "
                             f"a Lightning .ckpt, as fewshot adapt takes (default {DEFAULT_MODEL})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; "
                             "0.0.0.0 serves every network this machine is on)")
    parser.add_argument("--port", type=_port, default=8765,
                        help="port (default 8765; 0 picks a free one)")
    parser.add_argument("--max-upload-mb", type=_positive_float, default=20.0,
                        help="largest image accepted, in MB (default 20)")
    parser.add_argument("--max-images", type=_positive_int, default=1000,
                        help="most images the page holds at once (default 1000)")
    parser.add_argument("--log-requests", action="store_true", help="print every request")
    return parser


def main(argv: Sequence[str]) -> None:
    """Run ``fewshot app ...`` (``argv`` without the word ``app``) until interrupted."""
    args = build_parser().parse_args(list(argv))
    learner = load(args.checkpoint)
    if not isinstance(learner, Learner):
        raise ValueError(f"{args.checkpoint} is an adapted classifier; the page needs the model "
                         "to adapt: pass the model it came from")
    folder = Path(tempfile.mkdtemp(prefix="fewshot-app-"))
    try:
        workspace = Workspace(folder, int(args.max_upload_mb * 1_000_000), args.max_images)
        try:
            server = AppServer((args.host, args.port),
                               Session(learner, args.checkpoint, workspace),
                               quiet=not args.log_requests)
        except OSError as error:
            raise ValueError(f"cannot listen on {args.host}:{args.port} ({error.strerror or error}): "
                             "pass another --port, or --port 0 for a free one") from error
        # SIGTERM ends the server like Ctrl-C does, so the uploads folder is removed either way.
        signal.signal(signal.SIGTERM, _interrupt)
        reach = ("loopback only: other machines cannot reach it; --host 0.0.0.0 serves your "
                 "network" if server.loopback else
                 f"listening on {args.host}: anyone who can reach this machine can use the page "
                 "and upload files to it")
        print(f"fewshot app: {args.checkpoint} at {server.url} ({reach})")
        print(f"Uploads are kept in {folder} and removed at exit. Ctrl-C stops the server.",
              flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            print("\nfewshot app: stopped", flush=True)
        finally:
            server.server_close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {value}")
    return port


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


if __name__ == "__main__":
    main(sys.argv[1:])
