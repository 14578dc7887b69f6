"""FC100 from format-exact fake pickles: reading, the superclass checks, the archive, download."""

from __future__ import annotations

import json
import pickle
import zipfile

import numpy as np
import pytest
from fake_datasets import SPLITS_DIR, write_fc100_pickles
from http_server import serve

from fewshot.data.download import DatasetNotFoundError, IntegrityError
from fewshot.data.fc100 import CIFAR100_COARSE_OF, CIFAR100_FINE_NAMES, FC100
from fewshot.data.mirror import MIRROR_ENV

PER_CLASS = 3


@pytest.fixture(autouse=True)
def _small_classes(monkeypatch):
    monkeypatch.setattr(FC100, "images_per_class", PER_CLASS)


@pytest.mark.skipif(not (SPLITS_DIR / "cifar_fs").is_dir(), reason="no shared CIFAR-FS split")
def test_the_superclass_table_is_cifar100s():
    """Every [superclass, class] pair of the published CIFAR-FS split agrees with the table."""
    pairs = [pair for split in ("train", "val", "test")
             for pair in json.loads((SPLITS_DIR / "cifar_fs" / f"{split}.json").read_text())]
    coarse_names = sorted({coarse for coarse, _ in pairs})
    assert len(pairs) == 100 and len(coarse_names) == 20
    for coarse, fine in pairs:
        assert coarse_names[CIFAR100_COARSE_OF[CIFAR100_FINE_NAMES.index(fine)]] == coarse, fine


def test_counts_classes_and_pixels(tmp_path):
    written = write_fc100_pickles(tmp_path / "FC100", PER_CLASS)
    for split, n in (("train", 60), ("val", 20), ("test", 20)):
        data = FC100(tmp_path, split, cache_dir=tmp_path / "c")  # found one folder down
        assert len(data.classes) == n and data.class_sizes == [PER_CLASS] * n
    data = FC100(tmp_path, "val", cache_dir=tmp_path / "c")
    labels = np.asarray(written["val"]["labels"])
    fine = CIFAR100_FINE_NAMES.index(data.classes[2])
    want = written["val"]["data"][labels == fine].transpose(0, 3, 1, 2) / 255.0
    np.testing.assert_allclose(data.load_class_images(2, list(range(PER_CLASS))).numpy(), want,
                               atol=1e-6)


def test_a_split_with_part_of_a_superclass_is_refused(tmp_path):
    write_fc100_pickles(tmp_path, PER_CLASS)
    path = tmp_path / "FC100_val.pickle"
    with open(path, "rb") as f:
        data = pickle.load(f)
    # Swap one val class for a class of a train superclass: still 20 classes of 3 images.
    gone = data["labels"][0]
    intruder = next(f for f in range(100) if CIFAR100_COARSE_OF[f] == 0)
    data["labels"] = [intruder if label == gone else label for label in data["labels"]]
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=2)
    with pytest.raises(IntegrityError, match="holds only part of superclass"):
        FC100(tmp_path, "val", cache_dir=tmp_path / "c")


def test_an_incomplete_copy_is_reported_with_counts(tmp_path):
    write_fc100_pickles(tmp_path, PER_CLASS)
    path = tmp_path / "FC100_test.pickle"
    with open(path, "rb") as f:
        data = pickle.load(f)
    data["data"], data["labels"] = data["data"][:-1], data["labels"][:-1]
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=2)
    with pytest.raises(IntegrityError, match=r"expected 20 classes of 3 images.*\(2\)"):
        FC100(tmp_path, "test", cache_dir=tmp_path / "c")


def fc100_zip(tmp_path) -> bytes:
    source = tmp_path / "source"
    write_fc100_pickles(source, PER_CLASS)
    archive = tmp_path / "fc100.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(source.iterdir()):
            zf.write(path, path.name)
    return archive.read_bytes()


def test_the_archive_is_extracted_and_download_fetches_it(tmp_path, monkeypatch):
    data = fc100_zip(tmp_path)
    with serve({"fc100.zip": data}) as server:
        monkeypatch.setenv(MIRROR_ENV, server.base)
        root = tmp_path / "root"
        train = FC100(root, "train", download=True, cache_dir=tmp_path / "c")
        FC100(root, "test", download=True, cache_dir=tmp_path / "c")
        assert [name for name, _ in server.requests] == ["fc100.zip"]
    assert len(train.classes) == 60 and (root / "FC100_val.pickle").is_file()


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="FC100 not found .* --data.download true"):
        FC100(tmp_path, "train")
    with pytest.raises(ValueError, match="class_split must be None or 'oreshkin'"):
        FC100(tmp_path, "train", class_split="bertinetto")
