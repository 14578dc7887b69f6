"""tiered-ImageNet from format-exact fake pickles: reading, strict checks, split files, download."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from fake_datasets import SPLITS_DIR, tiered_classes, write_tiered_imagenet_pickles
from http_server import serve
from PIL import Image

from fewshot.data.download import MANIFEST_NAME, DatasetNotFoundError, IntegrityError
from fewshot.data.image_decoding import BadImageError
from fewshot.data.mirror import MIRROR_ENV
from fewshot.data.tiered_imagenet import TieredImageNet


@pytest.fixture(scope="module")
def tiered(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiered")
    return root, write_tiered_imagenet_pickles(root)


def test_counts_classes_and_pixels(tiered, tmp_path):
    root, written = tiered
    for split, (n_classes, _) in {"train": (351, 20), "val": (97, 6), "test": (160, 8)}.items():
        data = TieredImageNet(root, split, image_size=12, cache_dir=tmp_path)
        assert len(data.classes) == n_classes and data.class_sizes == [2] * n_classes
        assert data.classes == list(tiered_classes()[split])
    # Class c's images are the ones labelled c, in file order, with the PNG's exact pixels.
    labels = written["val"]["labels"]
    c = 5
    rows = np.flatnonzero(labels["label_specific"] == c)
    data = TieredImageNet(root, "val", image_size=12, cache_dir=tmp_path)
    got = data.load_class_images(c, [0, 1])
    want = written["val"]["pixels"][rows].transpose(0, 3, 1, 2) / 255.0
    np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


def test_the_authors_names_without_prefix_in_a_subfolder(tmp_path):
    write_tiered_imagenet_pickles(tmp_path / "root" / "tiered-imagenet", prefix="", splits=("test",))
    data = TieredImageNet(tmp_path / "root", "test", image_size=12, cache_dir=tmp_path / "c")
    assert len(data.classes) == 160


@pytest.mark.skipif(not (SPLITS_DIR / "tiered_imagenet").is_dir(), reason="no shared split CSVs")
def test_the_authors_split_files_are_checked(tiered, tmp_path):
    root, _ = tiered
    data = TieredImageNet(root, "train", class_split=str(SPLITS_DIR / "tiered_imagenet"),
                          image_size=12, cache_dir=tmp_path)
    assert len(data.classes) == 351
    # A split folder naming other classes is refused, naming them.
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    for split in ("train", "val", "test"):
        rows = (SPLITS_DIR / "tiered_imagenet" / f"{split}.csv").read_text().splitlines()
        if split == "train":
            rows[0] = "n99999999,n01524359"
        (wrong / f"{split}.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(IntegrityError, match=r"missing \['n99999999'\]"):
        TieredImageNet(root, "train", class_split=str(wrong), image_size=12, cache_dir=tmp_path)


def _rewrite_labels(folder, split, change):
    path = folder / f"tiered-imagenet-{split}_labels.pkl"
    with open(path, "rb") as f:
        labels = pickle.load(f)
    change(labels)
    with open(path, "wb") as f:
        pickle.dump(labels, f, protocol=2)


def _drop_a_class(labels):
    labels["label_specific_str"] = labels["label_specific_str"][:-1]
    labels["label_specific"] = np.minimum(labels["label_specific"], 95)


def _tear_a_class_between_categories(labels):
    first = np.flatnonzero(labels["label_specific"] == 0)[0]
    labels["label_general"][first] = (labels["label_general"][first] + 1) % 6


@pytest.mark.parametrize(("change", "message"), [
    (_drop_a_class, "expected 97 distinct classes, found 96"),
    (_tear_a_class_between_categories, "classes labelled with several categories"),
    (lambda labels: labels.pop("label_general_str"), "is not a tiered-ImageNet labels file"),
    (lambda labels: labels.update(label_specific=labels["label_specific"][:-1]),
     "class labels and"),
])
def test_damaged_labels_are_named(tmp_path, change, message):
    write_tiered_imagenet_pickles(tmp_path, splits=("val",))
    _rewrite_labels(tmp_path, "val", change)
    with pytest.raises(IntegrityError, match=message):
        TieredImageNet(tmp_path, "val", image_size=12, cache_dir=tmp_path / "c")


def test_a_corrupt_png_is_named_or_skipped(tmp_path):
    write_tiered_imagenet_pickles(tmp_path, images_per_class=3, splits=("val",))
    path = tmp_path / "tiered-imagenet-val_images_png.pkl"
    with open(path, "rb") as f:
        images = pickle.load(f)
    images[7] = np.frombuffer(b"not a png", dtype=np.uint8)
    with open(path, "wb") as f:
        pickle.dump(images, f, protocol=2)
    with pytest.raises(BadImageError, match=r"tiered-imagenet-val_images_png.pkl\[7\]"):
        TieredImageNet(tmp_path, "val", image_size=12, cache_dir=tmp_path / "c")
    with pytest.warns(UserWarning, match="Skipped 1"):
        data = TieredImageNet(tmp_path, "val", image_size=12, cache_dir=tmp_path / "c",
                              skip_bad_images=True)
    assert sum(data.class_sizes) == 97 * 3 - 1


def test_download_from_the_mirror(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_tiered_imagenet_pickles(source)
    files = {p.name: p.read_bytes() for p in source.iterdir()}
    with serve(files) as server:
        monkeypatch.setenv(MIRROR_ENV, server.base)
        data = TieredImageNet(tmp_path / "root", "val", image_size=12, download=True,
                              cache_dir=tmp_path / "c")
        assert sorted(name for name, _ in server.requests) == sorted(files)
    assert len(data.classes) == 97
    assert set(json.loads((tmp_path / "root" / MANIFEST_NAME).read_text())) == set(files)


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="tiered-ImageNet not found .* --data.download"):
        TieredImageNet(tmp_path, "train")
    with pytest.raises(ValueError, match="class_split must be None, 'ren' or a folder"):
        TieredImageNet(tmp_path, "train", class_split="ravi")


def test_png_fakes_decode_as_written():
    pixels = np.arange(12 * 12 * 3, dtype=np.uint8).reshape(12, 12, 3)
    from fake_datasets import png_bytes

    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png_bytes(pixels)))), pixels)
