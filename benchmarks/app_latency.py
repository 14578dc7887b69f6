"""Latency of the web page (``fewshot app``): from clicking Adapt to the predictions on screen.

    flock /tmp/fewshot-bench.lock python benchmarks/app_latency.py [--repeats 20]

The shipped model (omniglot-5way-1shot) on a 5-way 5-shot task of real Omniglot characters it
never saw (the test part of MAML's split), with 20 query images (4 per class) already on the
page. Headless Chromium (Debian's chromium and chromium-driver, through Selenium) clicks
Adapt; the page measures from the click event to the first frame painted after it has drawn
the 20 predictions (``document.body.dataset.adaptMs``). Also shown: the server's part
(adapting plus predicting, decoding the PNGs included) and the time Selenium saw from its click
to the page's "done" mark (which adds its polling, up to 20 ms). The first click of a fresh
server is reported on its own; the medians are over the repeats after it. The target is under
1 s. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "app"))  # the page driver and the task writer the tests use

from browser_page import Page, browser_missing, chromium, running_app  # noqa: E402
from omniglot_task import OMNIGLOT, have_omniglot, write_omniglot_task  # noqa: E402

MODEL, WAYS, SHOTS, QUERIES_PER_CLASS, TARGET_MS = "omniglot-5way-1shot", 5, 5, 4, 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="clicks after the first (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="which characters and drawings")
    args = parser.parse_args()
    if browser_missing():
        sys.exit(f"app_latency: {browser_missing()}")
    if not have_omniglot():
        sys.exit(f"app_latency: no Omniglot archives in {OMNIGLOT} (set FEWSHOT_OMNIGLOT_ROOT)")
    with tempfile.TemporaryDirectory() as folder:
        support, query = write_omniglot_task(Path(folder), WAYS, SHOTS, QUERIES_PER_CLASS, args.seed)
        driver = chromium()
        try:
            with running_app(MODEL) as server:
                page = Page(driver, server.url).open()
                for character in sorted(p.name for p in support.iterdir()):
                    page.pick_for_class(page.add_class(character), sorted((support / character).glob("*.png")))
                page.pick("#query-files", sorted(query.glob("*/*.png")))
                clicks = []
                for _ in range(args.repeats + 1):
                    start = time.perf_counter()
                    page_ms = page.adapt()
                    seen_ms = 1000 * (time.perf_counter() - start)
                    server_ms = float(driver.execute_script("return document.body.dataset.serverMs"))
                    shown = page.predictions()
                    assert len(shown) == WAYS * QUERIES_PER_CLASS and all(r["label"] for r in shown)
                    assert page.messages() == [], page.messages()
                    clicks.append((page_ms, server_ms, seen_ms))
                correct = sum(row["label"] == _character_of(row["name"], query) for row in shown)
        finally:
            driver.quit()
    first, rest = clicks[0], clicks[1:]
    medians = [statistics.median(column) for column in zip(*rest, strict=True)]
    print(f"fewshot app, {MODEL}, {WAYS}-way {SHOTS}-shot, {WAYS * QUERIES_PER_CLASS} query images, "
          f"{args.repeats} clicks after the first; torch {torch.__version__}, "
          f"{os.cpu_count()} CPU(s), {platform.processor() or platform.machine()}")
    print(f"{'':<28}{'page (click to painted)':>26}{'server (adapt+predict)':>25}{'seen by Selenium':>19}")
    print(f"{'first click':<28}{first[0]:>23.0f} ms{first[1]:>22.0f} ms{first[2]:>16.0f} ms")
    print(f"{'median of the others':<28}{medians[0]:>23.0f} ms{medians[1]:>22.0f} ms{medians[2]:>16.0f} ms")
    print(f"{'slowest of the others':<28}{max(c[0] for c in rest):>23.0f} ms"
          f"{max(c[1] for c in rest):>22.0f} ms{max(c[2] for c in rest):>16.0f} ms")
    print(f"Predictions right: {correct}/{len(shown)}. Target: under {TARGET_MS:.0f} ms from click "
          f"to predictions: {'met' if medians[0] < TARGET_MS and first[0] < TARGET_MS else 'NOT met'}.")
    print(json.dumps({
        "benchmark": "app_latency", "model": MODEL, "ways": WAYS, "shots": SHOTS,
        "queries": WAYS * QUERIES_PER_CLASS, "repeats": args.repeats,
        "first_click_ms": round(first[0], 1), "median_click_to_predictions_ms": round(medians[0], 1),
        "max_click_to_predictions_ms": round(max(c[0] for c in rest), 1),
        "median_server_ms": round(medians[1], 1), "median_seen_by_selenium_ms": round(medians[2], 1),
        "correct": correct, "target_ms": TARGET_MS, "torch": torch.__version__,
        "cpus": os.cpu_count()}))


def _character_of(name: str, query: Path) -> str:
    (path,) = query.glob(f"*/{name}")
    return path.parent.name


if __name__ == "__main__":
    main()
