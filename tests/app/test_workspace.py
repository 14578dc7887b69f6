"""The page's classes and images: uploads are checked and kept only inside the folder, under
names the server chooses; the task is refused until it is complete, saying what is missing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fewshot.app.workspace import Workspace, WorkspaceError, display_name


def png(seed: int = 0, size: int = 28, mode: str = "L") -> bytes:
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def workspace(tmp_path):
    folder = tmp_path / "uploads"
    folder.mkdir()
    return Workspace(folder, max_upload_bytes=20_000, max_images=5)


def test_uploads_land_in_the_folder_under_the_servers_names(workspace):
    image_class = workspace.add_class("cats")
    for hostile in ("../../escape.png", "/etc/passwd.png", "..\\..\\win.png", "a\x00b\n.png", ""):
        image = workspace.add_image(image_class.id, hostile, png())
        assert image.path.parent == workspace.folder
        assert image.path.name == f"{image.id}.png"
        assert "/" not in image.name and "\\" not in image.name and "\x00" not in image.name
    assert sorted(p.name for p in workspace.folder.iterdir()) == sorted(
        i.path.name for i in image_class.images)
    assert [i.name for i in image_class.images] == ["escape.png", "passwd.png", "win.png", "ab.png",
                                                    "unnamed file"]
    assert not (workspace.folder.parent / "escape.png").exists()


def test_what_is_not_an_image_is_refused_and_not_kept(workspace):
    image_class = workspace.add_class()
    jpeg = io.BytesIO()
    Image.new("RGB", (10, 10)).save(jpeg, format="JPEG")
    cases = [("notes.txt", b"just text", "notes.txt is not an image", 400),
             ("cut.png", png()[:60], "cut.png is a damaged image", 400),
             ("empty.png", b"", "empty.png is not an image", 400),
             ("big.png", png(size=300, mode="RGB"), "big.png is 270.", 413),
             ("sneaky.png", jpeg.getvalue()[:-200], "sneaky.png is a damaged image", 400)]
    for name, data, message, status in cases:
        with pytest.raises(WorkspaceError, match=message) as caught:
            workspace.add_image(image_class.id, name, data)
        assert caught.value.status == status
    assert list(workspace.folder.iterdir()) == [] and image_class.images == []
    assert workspace.add_image(image_class.id, "photo.jpg", jpeg.getvalue()).path.suffix == ".jpg"


def test_the_image_limit_counts_support_and_queries(workspace):
    image_class = workspace.add_class()
    for i in range(3):
        workspace.add_image(image_class.id, f"{i}.png", png(i))
    workspace.add_image(None, "q1.png", png(5))
    workspace.add_image(None, "q2.png", png(6))
    with pytest.raises(WorkspaceError, match="q3.png was not added: the page holds at most 5") as caught:
        workspace.add_image(None, "q3.png", png(7))
    assert caught.value.status == 409
    workspace.clear_queries()
    assert workspace.image_count() == 3 and len(list(workspace.folder.iterdir())) == 3


def test_class_names_are_checked_and_unique(workspace):
    first = workspace.add_class()
    assert first.name == "class 1" and workspace.add_class("  two\twords \n").name == "two words"
    assert workspace.add_class().name == "class 3"
    for name, message in (("", "cannot be empty"), ("   ", "cannot be empty"), (7, "must be text"),
                          ("x" * 101, "at most 100 characters"), ("two words", "already a class")):
        with pytest.raises(WorkspaceError, match=message):
            workspace.rename_class(first.id, name)
    assert workspace.rename_class(first.id, "one").name == "one"
    with pytest.raises(WorkspaceError, match="no class 'ffff'") as caught:
        workspace.rename_class("ffff", "x")
    assert caught.value.status == 404


def test_the_task_is_refused_until_complete_and_versions_follow_changes(workspace):
    with pytest.raises(WorkspaceError, match="at least 2 classes, and the page has no classes"):
        workspace.support()
    cats = workspace.add_class("cats")
    workspace.add_image(cats.id, "c.png", png(1))
    with pytest.raises(WorkspaceError, match=r"has one class \('cats'\)"):
        workspace.support()
    dogs = workspace.add_class("dogs")
    with pytest.raises(WorkspaceError, match="class 'dogs' has no images"):
        workspace.support()
    dog = workspace.add_image(dogs.id, "d.png", png(2))
    paths, labels, version = workspace.support()
    assert labels == ["cats", "dogs"] and paths[1] == dog.path
    workspace.add_image(None, "q.png", png(3))  # a query changes no class
    assert workspace.support()[2] == version
    workspace.rename_class(dogs.id, "wolves")
    assert workspace.support()[2] > version
    workspace.delete_image(dog.id)
    assert not dog.path.exists()
    workspace.delete_class(cats.id)
    assert workspace.snapshot()["classes"] == [{"id": dogs.id, "name": "wolves", "images": []}]
    assert len(list(workspace.folder.iterdir())) == 1  # the query
    with pytest.raises(WorkspaceError, match="no image"):
        workspace.delete_image(dog.id)


def test_display_names_are_printable_and_short():
    assert display_name("C:\\photos\\cat.png") == "cat.png"
    assert display_name("a\u202eb.png") == "ab.png"  # no right-to-left override
    assert len(display_name("x" * 500)) == 200
