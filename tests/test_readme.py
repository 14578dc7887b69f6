"""The README's Python code blocks run as they are written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def write_my_task(folder: Path) -> None:
    """``my_task/support/<class>/*.png`` and ``my_task/query/*.png``, as the README describes."""
    rng = np.random.default_rng(0)
    for c in range(3):
        for i in range(2):
            path = folder / "my_task" / "support" / f"class_{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((105, 105)) > 0.1).astype(np.uint8) * 255).save(path)
    for i in range(4):
        path = folder / "my_task" / "query" / f"q{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((105, 105)) > 0.1).astype(np.uint8) * 255).save(path)


def test_the_readme_has_the_promised_examples():
    text = "\n".join(BLOCKS)
    assert 'fewshot.load("omniglot-5way-1shot")' in text       # a shipped model, by name
    assert "InnerLoop(loss=F.mse_loss)" in text                # your own module, loss and loop
    assert len(BLOCKS) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_my_task(tmp_path)
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)
    if "after" in namespace and "before" in namespace:  # the sine-wave example learns
        assert namespace["after"] < namespace["before"]
    if "predictions" in namespace:
        assert len(namespace["predictions"].labels) == 4
        assert (tmp_path / "my_model" / "README.md").is_file()
