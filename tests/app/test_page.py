"""The page in a real browser (headless Chromium): a task of real Omniglot characters taught on
the page gives the predictions ``fewshot adapt`` gives for the same files, the downloaded
classifier reads back with the same predictions, and every bad input gets a message on the page
while the server keeps serving.

Screenshots go to a temporary folder; ``FEWSHOT_SCREENSHOTS=docs/images`` writes the README's
(``app-classes.png``, ``app-predictions.png``) instead.
"""

from __future__ import annotations

import io
import json
import os
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from browser_page import Page, browser_missing, chromium, running_app
from omniglot_task import have_omniglot, write_omniglot_task
from PIL import Image

import fewshot
from fewshot.cli import main

MISSING = browser_missing()
if MISSING and os.environ.get("FEWSHOT_REQUIRE_BROWSER"):  # CI (.ci/run) installs the browser
    raise RuntimeError(f"FEWSHOT_REQUIRE_BROWSER is set, but {MISSING}")
pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    downloads = tmp_path_factory.mktemp("downloads")
    browser = chromium(downloads)
    browser.downloads = downloads
    yield browser
    browser.quit()


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def screenshot(element, name: str, folder: Path, down_to=None) -> Path:
    """A small PNG of ``element`` (256-colour palette: the page is flat colours), cut below
    the element ``down_to`` when given."""
    image = Image.open(io.BytesIO(element.screenshot_as_png)).convert("RGB")
    if down_to is not None:
        bottom = down_to.location["y"] + down_to.size["height"] - element.location["y"] + 12
        image = image.crop((0, 0, image.width, min(image.height, bottom)))
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    return path


@pytest.mark.real_data
@pytest.mark.skipif(not have_omniglot(), reason="no real Omniglot archives")
def test_a_real_task_taught_on_the_page_predicts_as_fewshot_adapt(driver, tmp_path):
    support, query = write_omniglot_task(tmp_path / "task", ways=5, shots=1, queries=5, seed=3)
    characters = sorted(p.name for p in support.iterdir())
    # The order fewshot adapt reads them in: classes sorted, then each class's images sorted.
    queries = sorted(query.glob("*/*.png"))
    with running_app() as server:
        page = Page(driver, server.url).open()
        model = {d.get_attribute("data-field"): d.text for d in page.find_all("#model dd")}
        assert "omniglot, 5-way 1-shot" in model["trained on"]
        assert "MAML" in model["algorithm"] and "97.32 ± 0.30%" in model["test accuracy"]
        assert model["batch norm"].startswith("transductive")
        for index, character in enumerate(characters):
            class_id = page.add_class(character)
            images = sorted((support / character).glob("*.png"))
            if index % 2:  # both ways in: drag and drop, and the file picker
                page.drop_on_class(class_id, images)
            else:
                page.pick_for_class(class_id, images)
            card = page.find(f'.class-card[data-class-id="{class_id}"]')
            assert card.find_element("css selector", ".count").text == "1 image"
            assert len(card.find_elements("css selector", ".thumbs img")) == 1
        page.pick("#query-files", queries)
        assert len(page.find_all("#predictions .prediction")) == 25
        milliseconds = page.adapt()
        assert milliseconds > 0 and page.messages() == []
        shown = page.predictions()
        main(["adapt", "--checkpoint", "omniglot-5way-1shot", "--support", str(support),
              "--query", str(query), "--output", str(tmp_path / "cli.json")])
        cli = json.loads((tmp_path / "cli.json").read_text())["predictions"]
        assert [row["name"] for row in shown] == [Path(r["image"]).name for r in cli]
        assert [row["label"] for row in shown] == [r["prediction"] for r in cli]
        np.testing.assert_allclose([row["probability"] for row in shown],
                                   [r["probability"] for r in cli], rtol=0, atol=1e-6)
        for row, expected in zip(shown, cli, strict=True):
            assert [c for c, _ in row["bars"]] == [b["class"] for b in expected["top_k"]]
            assert row["shown"] == f"{100 * expected['probability']:.1f}%"
        # The drawings are of the characters named by their folders: the model mostly knows them.
        correct = sum(row["label"] == Path(q).parent.name for row, q in zip(shown, queries, strict=True))
        assert correct >= 20, correct
        folder = Path(os.environ.get("FEWSHOT_SCREENSHOTS") or tmp_path / "screenshots")
        driver.set_window_size(1280, 2400)  # element screenshots stop at the window's edge
        folder = folder if folder.is_absolute() else REPO / folder
        for name, selector, down_to in (("app-classes.png", "main", page.find("#adapt-section")),
                                        ("app-predictions.png", "#query-section", None)):
            path = screenshot(page.find(selector), name, folder, down_to)
            assert 3_000 < path.stat().st_size < 400_000
        # Download the adapted classifier from the page; it reads back with the same predictions.
        page.find("#download").click()
        downloaded = driver.downloads / "fewshot-classifier.safetensors"
        deadline = time.monotonic() + 30
        while not downloaded.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        classifier = fewshot.load(downloaded)
        assert classifier.classes == characters
        again = classifier.predict(queries)
        assert again.labels == [row["label"] for row in shown]
        np.testing.assert_allclose(again.confidences, [row["probability"] for row in shown], atol=1e-6)
        main(["predict", "--checkpoint", str(downloaded), "--query", str(query),
              "--output", str(tmp_path / "again.json")])
        assert json.loads((tmp_path / "again.json").read_text())["predictions"] == cli
        # One at a time on the page is --one-at-a-time on the command line.
        page._after("predictCount", lambda: page.find("#one-at-a-time").click())
        assert "one image at a time" in page.find("#batching").text
        main(["adapt", "--checkpoint", "omniglot-5way-1shot", "--support", str(support),
              "--query", str(query), "--one-at-a-time", "--output", str(tmp_path / "alone.json")])
        alone = json.loads((tmp_path / "alone.json").read_text())["predictions"]
        np.testing.assert_allclose([row["probability"] for row in page.predictions()],
                                   [r["probability"] for r in alone], rtol=0, atol=1e-6)


def test_every_bad_input_gets_a_message_and_the_server_keeps_serving(driver, tmp_path):
    rng = np.random.default_rng(0)
    drawing = png_bytes((rng.random((105, 105)) > 0.2).astype(np.uint8) * 255)
    with running_app(max_upload_bytes=50_000, max_images=40) as server:
        page = Page(driver, server.url).open()

        def expect(message: str) -> None:
            assert any(message in m for m in page.messages()), (message, page.messages())
            assert "Traceback" not in driver.page_source

        page.adapt()
        expect("a task needs at least 2 classes, and the page has no classes")
        first = page.add_class("alpha")
        page.drop_on_class(first, [])  # an empty drop changes nothing
        page.drop(f'.class-card[data-class-id="{first}"]', [("a.png", drawing)])
        page.adapt()
        expect("the page has one class ('alpha')")
        second = page.add_class("beta")
        page.adapt()
        expect("class 'beta' has no images")
        page.rename(second, "alpha")
        expect("there is already a class named 'alpha'")
        (tmp_path / "notes.txt").write_text("not a picture")
        (tmp_path / "broken.png").write_bytes(drawing[: len(drawing) // 2])
        (tmp_path / "huge.png").write_bytes(png_bytes(rng.integers(0, 255, (300, 300, 3), dtype=np.uint8)))
        page.pick_for_class(second, [tmp_path / "notes.txt"])
        expect("notes.txt: notes.txt is not an image")
        page.pick_for_class(second, [tmp_path / "broken.png"])
        expect("broken.png: broken.png is a damaged image")
        page.pick_for_class(second, [tmp_path / "huge.png"])
        expect("huge.png is 270.")
        expect("the limit is 50.0 kB per file")
        card = page.find(f'.class-card[data-class-id="{second}"]')
        assert card.find_element("css selector", ".count").text == "0 images"
        # Many files at once: the page takes them in order until its limit, then says why not.
        many = [(f"q{i:03d}.png", drawing) for i in range(60)]
        page.drop("#query-drop", many)
        assert len(page.find_all("#predictions .prediction")) == 39  # 40 images, 1 is alpha's
        expect("q039.png: q039.png was not added: the page holds at most 40 images")
        expect("16 more file(s) were not added; the last: q059.png: q059.png was not added")
        # The server still serves, and the task works once it is complete.
        page._after("actionCount", lambda: page.find("#clear-queries").click())
        assert page.find_all("#predictions .prediction") == []
        page.drop(f'.class-card[data-class-id="{second}"]', [("b.png", drawing)])
        errors = page.counter("errorCount")
        page.adapt()
        assert page.counter("errorCount") == errors
        assert page.find("#status").text.startswith("Adapted to 2 classes (2 images")
        assert page.find("#download").is_displayed()
        page.rename(second, "gamma")  # the adapted model no longer matches the classes
        assert "press Adapt again" in page.find("#status").text
        assert not page.find("#download").is_displayed()
        state = json.loads(urllib.request.urlopen(server.url + "api/state").read())
        assert [(c["name"], len(c["images"])) for c in state["classes"]] == [("alpha", 1), ("gamma", 1)]
        page.delete_class(second)
        assert len(page.find_all(".class-card")) == 1
