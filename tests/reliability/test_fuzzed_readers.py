"""Property-based tests (Hypothesis): generated inputs for every reader of outside bytes.

The only outcomes allowed are success or fewshot's own named errors; never a write outside
the target folder, never a hang (each example has a deadline), never a traceback at the CLI.
Generated inputs are both random bytes and valid files with bytes flipped, cut or replaced,
which get past the first checks of a reader.

Profiles: ``ci`` (the default, about a minute on two cores) and ``large``
(``HYPOTHESIS_PROFILE=large``, 20 times the examples);
``--hypothesis-show-statistics`` prints the examples each reader ran.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile
from datetime import timedelta
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from fewshot.cli import main
from fewshot.data.download import IntegrityError, UnsafeArchiveError, extract_archive
from fewshot.data.image_decoding import decode_image_files
from fewshot.data.safe_pickle import load_pickle
from fewshot.inference.cli import read_support_folder
from fewshot.inference.export import CheckpointError, build_model, read_export
from fewshot.inference.images import ImageError, Preprocessing
from fewshot.pretrained import pretrained_path
from fewshot.training import cli as training_cli
from fewshot.training.original_flags import RENAMED, TRANSLATED, translate_original_flags

# Deadlines far above an example's usual time (milliseconds; a CLI parse under a second), so
# a loaded machine does not flake, yet a reader that hangs fails.
settings.register_profile("ci", max_examples=40, deadline=timedelta(seconds=20),
                          database=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("large", max_examples=800, deadline=timedelta(seconds=60),
                          database=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# The CLI builds LightningCLI's parser for each example (about 0.3 s): a quarter as many.
CLI_EXAMPLES = max(10, settings.default.max_examples // 4)


def mutated(valid: bytes) -> st.SearchStrategy[bytes]:
    """``valid`` with bytes flipped, cut off, inserted or replaced; or random bytes."""
    flips = st.lists(st.tuples(st.integers(0, max(len(valid) - 1, 0)), st.integers(1, 255)),
                     min_size=1, max_size=8)

    def flip(changes: list[tuple[int, int]]) -> bytes:
        data = bytearray(valid)
        for position, mask in changes:
            data[position] ^= mask
        return bytes(data)

    return st.one_of(
        flips.map(flip),
        st.integers(0, len(valid)).map(lambda n: valid[:n]),
        st.tuples(st.integers(0, len(valid)), st.binary(min_size=1, max_size=64)).map(
            lambda t: valid[:t[0]] + t[1] + valid[t[0]:]),
        st.binary(max_size=2048),
    )


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(folder.rglob("*"))}


# -- the restricted pickle reader -------------------------------------------------------------

PLAIN_DATA = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
HOSTILE = (b"cos\nsystem\n(S'touch /tmp/fewshot-fuzz-pwned'\ntR.",
           b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x94\x8c\x04eval\x94"
           b"\x93\x94\x8c\x041+1\x94\x85\x94R\x94.")


@st.composite
def pickles(draw) -> bytes:
    value = draw(PLAIN_DATA)
    if draw(st.booleans()):
        value = {"data": np.arange(draw(st.integers(0, 30)), dtype=np.uint8), "labels": value}
    valid = pickle.dumps(value, protocol=draw(st.integers(0, pickle.HIGHEST_PROTOCOL)))
    return draw(st.one_of(st.just(valid), mutated(valid), st.sampled_from(HOSTILE),
                          mutated(HOSTILE[1])))


@given(pickles())
# Found by the large profile: a frame length beyond any size (OverflowError), and one that
# asks for an allocation that fails (MemoryError).
@example(b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x9c\xe9\xcf\x89\x05\xbe6\x00\x8c\x08builtins"
         b"\x94\x8c\x04eval\x94\x93\x94\x8c\x041+1\x94\x85\x94R\x94.")
@example(b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x08builtins\x96\x8c\xe8eval]\x06\x94"
         b"\x8c\x041+1\x94\x85\x94R\x94.")
def test_the_restricted_pickle_reader(data):
    try:
        load_pickle(io.BytesIO(data), "fuzzed.pkl")
    except IntegrityError as error:  # UnsafePickleError among them
        assert "fuzzed.pkl" in str(error)
    assert not os.path.exists("/tmp/fewshot-fuzz-pwned")


# -- archive extraction ----------------------------------------------------------------------

MEMBER_NAMES = st.one_of(
    st.sampled_from(["a.png", "dir/b.png", "../escape.png", "/abs.png", "dir/../../up.png",
                     "..\\win.png", "C:/drive.png", "./c.png", "", ".", "dir/", "a/./b/../c",
                     "images_background/x/0.png", "~/home.png", "\u00e9t\u00e9.png"]),
    st.text(st.characters(blacklist_categories=["Cs"]), max_size=30))


@st.composite
def archives(draw) -> tuple[str, bytes]:
    members = draw(st.lists(st.tuples(MEMBER_NAMES, st.binary(max_size=200)), max_size=5))
    kind = draw(st.sampled_from(["zip", "tar", "tar.gz"]))
    buffer = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buffer, "w") as archive:
            for name, content in members:
                if name:
                    archive.writestr(name, content)
    else:
        with tarfile.open(fileobj=buffer, mode="w:gz" if kind == "tar.gz" else "w") as archive:
            for name, content in members:
                info = tarfile.TarInfo(name)
                kind_of_member = draw(st.sampled_from(["file", "file", "symlink", "hardlink",
                                                       "dir"]))
                if kind_of_member == "symlink":
                    info.type, info.linkname = tarfile.SYMTYPE, draw(MEMBER_NAMES)
                elif kind_of_member == "hardlink":
                    info.type, info.linkname = tarfile.LNKTYPE, draw(MEMBER_NAMES)
                elif kind_of_member == "dir":
                    info.type = tarfile.DIRTYPE
                info.size = len(content) if kind_of_member == "file" else 0
                archive.addfile(info, io.BytesIO(content) if kind_of_member == "file" else None)
    valid = buffer.getvalue()
    return kind, draw(st.one_of(st.just(valid), mutated(valid)))


@given(archives())
def test_archive_extraction(archive):
    kind, data = archive
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        (root / "outside.txt").write_bytes(b"untouched")
        path = root / f"fuzzed.{kind}"
        path.write_bytes(data)
        destination = root / "target"
        try:
            extract_archive(path, destination, max_total_bytes=10_000)
        except (UnsafeArchiveError, IntegrityError, ValueError) as error:
            assert "fuzzed" in str(error)
        outside = {name for name in files_under(root) if not name.startswith("target")}
        assert outside == {"outside.txt", path.name}  # nothing written beside the target
        assert (root / "outside.txt").read_bytes() == b"untouched"
        for written in destination.rglob("*") if destination.exists() else []:
            assert not written.is_symlink()
            assert written.resolve().is_relative_to(destination.resolve())


# -- image decoding (training) and the adapt folder reader -----------------------------------

def _encoded(fmt: str, mode: str) -> bytes:
    rng = np.random.default_rng(0)
    shape = (6, 5) if mode == "L" else (6, 5, 3)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buffer, format=fmt)
    return buffer.getvalue()


VALID_IMAGES = [_encoded(fmt, mode) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
                for mode in ("L", "RGB") if not (fmt == "GIF" and mode == "RGB")]
IMAGE_BYTES = st.sampled_from(VALID_IMAGES).flatmap(mutated)


@given(IMAGE_BYTES, st.sampled_from([1, 3]))
def test_image_decoding(data, channels):
    with tempfile.TemporaryDirectory() as temporary:
        path = Path(temporary) / "fuzzed.png"
        path.write_bytes(data)
        images, bad = decode_image_files([path], size=8, channels=channels)
        # Decoded, or named with the reason: never an exception.
        assert len(images) + len(bad) == 1
        if bad:
            assert bad[0][0] == str(path) and bad[0][1]
        else:
            assert images.shape == (1, channels, 8, 8) and images.dtype == np.uint8


CLASS_NAMES = st.one_of(st.sampled_from(["cat", "dog", ".hidden", "with space", "\u732b", "a.png"]),
                        st.text(st.characters(whitelist_categories=["L", "N"]), min_size=1,
                                max_size=12))
FILE_NAMES = st.tuples(st.text(st.characters(whitelist_categories=["L", "N"]), min_size=1,
                               max_size=8),
                       st.sampled_from([".png", ".JPG", ".jpeg", ".bmp", ".txt", "", ".webp"])
                       ).map("".join)


@given(st.dictionaries(CLASS_NAMES, st.dictionaries(FILE_NAMES, IMAGE_BYTES, max_size=3),
                       max_size=4),
       st.dictionaries(FILE_NAMES, IMAGE_BYTES, max_size=2), st.sampled_from([1, 3]))
def test_the_adapt_folder_reader(classes, loose, channels):
    with tempfile.TemporaryDirectory() as temporary:
        support = Path(temporary) / "support"
        support.mkdir()
        for name, files in classes.items():
            (support / name).mkdir(exist_ok=True)
            for file_name, data in files.items():
                (support / name / file_name).write_bytes(data)
        for file_name, data in loose.items():
            if not (support / file_name).exists():
                (support / file_name).write_bytes(data)
        before = files_under(Path(temporary))
        try:
            paths, labels = read_support_folder(support)
            images, names = Preprocessing.for_dataset("folder", 16, channels).prepare(paths)
            assert images.shape == (len(paths), channels, 16, 16) and len(set(labels)) >= 2
        except ImageError as error:
            assert str(error)
        assert files_under(Path(temporary)) == before  # a reader writes nothing


# -- the export JSON -------------------------------------------------------------------------

SHIPPED = pretrained_path("omniglot-5way-1shot")
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**6) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=3),
    max_leaves=8)


def _paths_in(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _paths_in(inner, (*prefix, key))


@st.composite
def export_jsons(draw) -> bytes:
    metadata = json.loads((SHIPPED / "fewshot.json").read_text())
    paths = [p for p in _paths_in(metadata) if p]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        parent = metadata
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        if draw(st.booleans()):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    text = json.dumps(metadata).encode()
    return draw(st.one_of(st.just(text), mutated(text)))


@given(export_jsons())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_the_export_json(tmp_path, data):
    export = tmp_path / "export"
    export.mkdir(exist_ok=True)
    shutil.copyfile(SHIPPED / "model.safetensors", export / "model.safetensors")
    (export / "fewshot.json").write_bytes(data)
    try:
        build_model(read_export(export))
    except CheckpointError as error:
        assert "export" in str(error) or "fewshot.json" in str(error)


# -- YAML configs and the CLI's arguments ----------------------------------------------------

OPTIONS = ["data.ways", "data.shots", "data.queries", "data.meta_batch_size", "data.image_size",
           "data.channels", "data.dataset", "data.class_split", "model.backbone",
           "model.algorithm", "model.algorithm.init_args.inner_lr", "model.executor",
           "trainer.max_steps", "trainer.accelerator", "trainer.devices", "trainer.precision",
           "checkpoint.every_n_train_steps", "ddp.timeout", "nonfinite.policy", "seed_everything"]
VALUES = st.one_of(st.integers(-3, 100), st.floats(allow_nan=True), st.booleans(), st.none(),
                   st.text(max_size=15),
                   st.sampled_from(["omniglot", "folder", "fewshot.models.Conv4", "cpu", "ddp",
                                    "fewshot.algorithms.Reptile", "64-true", "skip", "[1, 2]"]),
                   st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=5),
                                                                        st.integers(), max_size=2))


def _nested(flat: dict[str, object]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {}) if isinstance(node.get(parent, {}), dict) else {}
        node[leaf] = value
    return tree


@st.composite
def configs(draw) -> str:
    config = yaml.safe_dump(_nested(draw(st.dictionaries(st.sampled_from(OPTIONS), VALUES,
                                                         max_size=5))))
    return draw(st.one_of(st.just(config), mutated(config.encode()).map(
        lambda b: b.decode("utf-8", "replace"))))


ORIGINAL_FLAGS = [*RENAMED, *TRANSLATED, "--wandb", "--max_epochs", "--val_check_interval",
                  "--data.ways", "-c", "--config", "--help", "--print_config"]
ARGUMENTS = st.lists(st.one_of(
    st.sampled_from(ORIGINAL_FLAGS),
    st.tuples(st.sampled_from(ORIGINAL_FLAGS), VALUES.map(str)).map(lambda t: f"{t[0]}={t[1]}"),
    VALUES.map(str)), max_size=6)


@given(ARGUMENTS)
def test_the_original_flags_translation(argv):
    try:
        translated = translate_original_flags(["fit", *argv])
        assert all(isinstance(argument, str) for argument in translated)
    except ValueError as error:
        assert str(error)


def _cli_outcome(argv: list[str], capsys) -> tuple[int, str]:
    real = training_cli.build_cli

    def build_without_running(args):
        return real(list(args)[1:], run=False)  # the parsing, checks and classes; no training

    with mock.patch.object(training_cli, "build_cli", build_without_running), \
            mock.patch.dict(os.environ, {"FEWSHOT_DEBUG": ""}):
        try:
            main(argv)
            code = 0
        except SystemExit as exit_info:
            code = exit_info.code if isinstance(exit_info.code, int) else 1
    return code, capsys.readouterr().err


@given(configs(), ARGUMENTS)
# Found by the large profile: settings of the wrong type reaching a class (were tracebacks).
@example("trainer:\n  devices: null\n  precision: null\n", [])
@example("data:\n  shots: null\nddp:\n  timeout: null\n", [])
@settings(max_examples=CLI_EXAMPLES,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_yaml_configs_and_cli_arguments(tmp_path, capsys, config, argv):
    path = tmp_path / "fuzzed.yaml"
    path.write_text(config)
    assume("--help" not in argv and "--print_config" not in " ".join(argv))
    code, stderr = _cli_outcome(["fit", "-c", str(path), *argv,
                                 f"--trainer.default_root_dir={tmp_path / 'runs'}"], capsys)
    assert code in (0, 2), stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    if code == 2:
        assert "error:" in stderr


@pytest.fixture(autouse=True)
def _no_leftover_marker():
    yield
    assert not os.path.exists("/tmp/fewshot-fuzz-pwned")
