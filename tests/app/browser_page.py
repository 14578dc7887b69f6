"""Driving the page of ``fewshot app`` in headless Chromium (Selenium and Debian's chromium and
chromium-driver packages; nothing is downloaded at run time). Used by the browser tests and
``benchmarks/app_latency.py``."""

from __future__ import annotations

import base64
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from fewshot.app.server import AppServer
from fewshot.app.session import Session
from fewshot.app.workspace import Workspace
from fewshot.inference.learner import load

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
TIMEOUT = 120


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements/dev.txt)"
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        return (f"{' and '.join(missing)} not found: install Debian's chromium and chromium-driver "
                "(apt-get install chromium chromium-driver; .ci/run does)")
    return None


@contextmanager
def running_app(model: str = "omniglot-5way-1shot", max_upload_bytes: int = 20_000_000,
                max_images: int = 1000) -> Iterator[AppServer]:
    """The app's server on a free loopback port, in a thread, with its own uploads folder."""
    folder = Path(tempfile.mkdtemp(prefix="fewshot-app-test-"))
    server = AppServer(("127.0.0.1", 0), Session(load(model), model,
                                                 Workspace(folder, max_upload_bytes, max_images)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        shutil.rmtree(folder, ignore_errors=True)


def chromium(download_folder: Path | None = None, width: int = 1280, height: int = 1000):
    """A headless Chromium driven by chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}", "--force-device-scale-factor=1",
                     "--disable-extensions", "--no-first-run"):
        options.add_argument(argument)
    if download_folder is not None:
        options.add_experimental_option("prefs", {
            "download.default_directory": str(download_folder), "download.prompt_for_download": False})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


class Page:
    """The page at ``url`` in ``driver``, with the user's actions as methods that return when
    the page has finished them (it counts them in ``document.body.dataset``)."""

    def __init__(self, driver, url: str) -> None:
        self.driver, self.url = driver, url

    def open(self) -> Page:
        self.driver.get(self.url)
        self._wait(lambda: self.counter("ready") >= 1)
        return self

    def counter(self, name: str) -> int:
        return int(self.driver.execute_script(f"return document.body.dataset.{name} || 0"))

    def find(self, selector: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, selector)

    def find_all(self, selector: str) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, selector)

    def add_class(self, name: str | None = None) -> str:
        """Click "Add a class" (and rename it to ``name``); returns its id."""
        before = [card.get_attribute("data-class-id") for card in self.find_all(".class-card")]
        self._after("actionCount", lambda: self.find("#add-class").click())
        card = self.find_all(".class-card")[-1]
        class_id = card.get_attribute("data-class-id")
        assert class_id not in before
        if name is not None:
            self.rename(class_id, name)
        return class_id

    def rename(self, class_id: str, name: str) -> None:
        from selenium.webdriver.common.keys import Keys

        field = self.find(f'.class-card[data-class-id="{class_id}"] .class-name')
        # Select all and type over it (clear() would send the empty name on its own first).
        self._after("actionCount", lambda: field.send_keys(Keys.CONTROL, "a", Keys.NULL, name,
                                                           Keys.ENTER))

    def delete_class(self, class_id: str) -> None:
        self._after("actionCount", lambda: self.find(
            f'.class-card[data-class-id="{class_id}"] .delete-class').click())

    def pick(self, selector: str, paths: Sequence[Path]) -> None:
        """Choose ``paths`` in the file picker ``selector``, as a user does, in that order."""
        self._after("uploadCount", lambda: self.find(selector).send_keys(
            "\n".join(str(Path(p).resolve()) for p in paths)))

    def pick_for_class(self, class_id: str, paths: Sequence[Path]) -> None:
        self.pick(f'.class-card[data-class-id="{class_id}"] .class-files', paths)

    def drop(self, selector: str, files: Sequence[tuple[str, bytes]]) -> None:
        """Drop ``files`` (name, contents) on the element ``selector``, as a drag from the
        desktop does: a drop event whose DataTransfer holds the files."""
        payload = [[name, base64.b64encode(data).decode()] for name, data in files]
        script = """
            const [selector, files] = arguments;
            const transfer = new DataTransfer();
            for (const [name, data] of files) {
              const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
              transfer.items.add(new File([bytes], name));
            }
            document.querySelector(selector).dispatchEvent(
              new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        """
        self._after("uploadCount", lambda: self.driver.execute_script(script, selector, payload))

    def drop_on_class(self, class_id: str, paths: Sequence[Path]) -> None:
        self.drop(f'.class-card[data-class-id="{class_id}"]',
                  [(Path(p).name, Path(p).read_bytes()) for p in paths])

    def adapt(self) -> float:
        """Click Adapt; returns the milliseconds the page measured from the click to the
        predictions painted."""
        self._after("adaptCount", lambda: self.find("#adapt").click())
        return float(self.driver.execute_script("return document.body.dataset.adaptMs || 'nan'"))

    def predictions(self) -> list[dict]:
        """Every query shown: its name, predicted label and probability, and the bars."""
        rows = self.driver.execute_script("""
            return Array.from(document.querySelectorAll('#predictions .prediction')).map((card) => ({
              name: card.querySelector('.query-name').textContent,
              label: card.querySelector('.label') ? card.querySelector('.label').textContent : null,
              probability: card.querySelector('.probability')
                ? Number(card.querySelector('.probability').dataset.probability) : null,
              shown: card.querySelector('.probability') ? card.querySelector('.probability').textContent : null,
              bars: Array.from(card.querySelectorAll('.bar')).map((bar) => [bar.dataset.class, Number(bar.dataset.probability)]),
            }));""")
        return rows

    def messages(self) -> list[str]:
        return [m.text for m in self.find_all("#messages .message span")]

    def _after(self, counter: str, action) -> None:
        before = self.counter(counter)
        action()
        self._wait(lambda: self.counter(counter) > before)

    def _wait(self, condition, timeout: float = TIMEOUT) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.driver, timeout, poll_frequency=0.02).until(lambda _: condition())
