"""User images reach the model prepared exactly like the training data, or are refused by name."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from fewshot.data.omniglot import Omniglot
from fewshot.inference.images import ImageError, Preprocessing

OMNIGLOT = Preprocessing.for_dataset("omniglot", image_size=28, channels=1)


def strokes(size: int = 105, mode: str = "L") -> Image.Image:
    """Dark strokes on white paper, as a user draws a character."""
    pixels = np.full((size, size), 255, dtype=np.uint8)
    pixels[size // 4: size // 2, size // 5: 4 * size // 5] = 0
    pixels[:, size // 2] = 0
    return Image.fromarray(pixels).convert(mode)


def test_a_png_is_prepared_exactly_as_the_dataset_prepares_it(fake_root, tmp_path):
    dataset = Omniglot(fake_root, split="test", class_split="lake", cache_dir=tmp_path / "cache")
    with zipfile.ZipFile(fake_root / "images_evaluation.zip") as archive:
        first = sorted(n for n in archive.namelist() if n.endswith(".png"))[0]
        (tmp_path / "drawing.png").write_bytes(archive.read(first))
    prepared, names = OMNIGLOT.prepare(tmp_path / "drawing.png")
    assert names == [str(tmp_path / "drawing.png")]
    expected = dataset.load_class_images(0, [0])  # class 0, image 0 is that very PNG
    assert prepared.shape == (1, 1, 28, 28)
    assert torch.equal(prepared, expected)


def test_omniglot_images_are_inverted_so_strokes_are_bright():
    prepared, _ = OMNIGLOT.prepare(strokes())
    assert prepared.max() == 1.0 and prepared.mean() < 0.5  # bright strokes, dark background


def test_transparent_background_counts_as_white_paper():
    ink = np.array(strokes()) < 128
    rgba = np.zeros((105, 105, 4), dtype=np.uint8)  # transparent black everywhere...
    rgba[ink, 3] = 255  # ...except opaque black strokes
    transparent, _ = OMNIGLOT.prepare(Image.fromarray(rgba, "RGBA"))
    white, _ = OMNIGLOT.prepare(strokes())
    assert torch.allclose(transparent, white, atol=1 / 255)


def test_colour_images_are_converted_to_the_model_channels():
    gray, _ = OMNIGLOT.prepare(strokes())
    from_rgb, _ = OMNIGLOT.prepare(strokes(mode="RGB"))
    assert torch.equal(gray, from_rgb)
    rgb_model = Preprocessing(channels=3, image_size=28, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    from_gray, _ = rgb_model.prepare(strokes())
    assert from_gray.shape == (1, 3, 28, 28)
    assert torch.equal(from_gray[:, 0], from_gray[:, 2])
    assert from_gray.min() == pytest.approx(-2.0) and from_gray.max() == pytest.approx(2.0)


def test_tensors_are_taken_as_prepared_and_resized_or_expanded_when_safe():
    x = torch.rand(2, 1, 28, 28)
    prepared, names = OMNIGLOT.prepare(x)
    assert torch.equal(prepared, x) and names == ["image[0]", "image[1]"]
    mixed, names = OMNIGLOT.prepare([x[0], strokes(), torch.rand(1, 56, 56)])
    assert mixed.shape == (3, 1, 28, 28) and names == ["image[0]", "image[1]", "image[2]"]
    constant = OMNIGLOT.prepare(torch.full((1, 56, 56), 0.25))[0]
    assert torch.allclose(constant, torch.full((1, 1, 28, 28), 0.25))
    rgb = Preprocessing(channels=3, image_size=28).prepare(torch.rand(1, 28, 28))[0]
    assert rgb.shape == (1, 3, 28, 28)


@pytest.mark.parametrize(("image", "message"), [
    (torch.rand(3, 28, 28), "image\\[0\\] has 3 channels but the model takes 1"),
    (torch.rand(1, 28, 40), "image\\[0\\] is 40x28, not square"),
    (torch.zeros(1, 28, 28, dtype=torch.uint8), "image\\[0\\] is a torch.uint8 tensor"),
    (torch.rand(28, 28), "shape \\(28, 28\\)"),
    (42, "images must be a path, a PIL image, a tensor or a list of them, got a int"),
    ([42], "image\\[0\\] is a int; pass a file path, a PIL image or a tensor"),
    ([], "no images given"),
])
def test_images_that_cannot_be_used_are_refused_by_name(image, message):
    with pytest.raises(ImageError, match=message):
        OMNIGLOT.prepare(image)


def test_bad_files_are_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageError, match="broken.png is not a readable image"):
        OMNIGLOT.prepare(tmp_path / "broken.png")
    with pytest.raises(ImageError, match="missing.png does not exist"):
        OMNIGLOT.prepare(str(tmp_path / "missing.png"))
    with pytest.raises(ImageError, match="is a folder"):
        OMNIGLOT.prepare(tmp_path)


def test_preprocessing_round_trips_through_its_dict_and_checks_values():
    assert Preprocessing.from_dict(OMNIGLOT.to_dict()) == OMNIGLOT
    assert OMNIGLOT.to_dict()["invert"] is True
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        Preprocessing(channels=2, image_size=28)
    with pytest.raises(ValueError, match="std needs 1 or 3 values"):
        Preprocessing(channels=3, image_size=28, std=(1.0, 1.0))
    for dataset in ("mini_imagenet", "cifar_fs", "folder"):  # photos: not inverted
        assert not Preprocessing.for_dataset(dataset, 84, 3).invert
    with pytest.raises(ValueError, match="no preprocessing is known for dataset 'imagenet'"):
        Preprocessing.for_dataset("imagenet", 84, 3)


@pytest.mark.parametrize("resize", ["squash", "crop", "pad"])
@pytest.mark.parametrize("channels", [1, 3])
def test_training_decoder_and_adapt_prepare_a_photo_identically(tmp_path, resize, channels):
    """A non-square photo: the folder dataset's decoder (training) and Preprocessing (adapt)
    give the same tensor under each resize policy, and the policies differ."""
    from fewshot.data.image_folder import ImageFolder

    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in range(2):
            folder = tmp_path / "data" / split / f"{split}{c}"
            folder.mkdir(parents=True)
            pixels = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)  # 50 wide, 30 tall
            Image.fromarray(pixels).save(folder / "photo.png")
    data = ImageFolder(tmp_path / "data", "train", image_size=16, channels=channels,
                       cache_dir=tmp_path / "cache", resize=resize)
    trained = data.load_class_images(0, [0])
    adapted, _ = Preprocessing(channels=channels, image_size=16, resize=resize).prepare(
        tmp_path / "data" / "train" / "train0" / "photo.png")
    torch.testing.assert_close(adapted, trained, rtol=0, atol=0)
    others = [Preprocessing(channels=channels, image_size=16, resize=other).prepare(
        tmp_path / "data" / "train" / "train0" / "photo.png")[0] for other in ("squash", "crop", "pad")]
    assert len({tuple(o.flatten().tolist()) for o in others}) == 3


def test_the_resize_policy_is_recorded_and_old_exports_squash():
    crop = Preprocessing(channels=3, image_size=84, resize="crop")
    assert crop.to_dict()["resize"] == "crop" and Preprocessing.from_dict(crop.to_dict()) == crop
    old = {"channels": 1, "image_size": 28, "invert": True, "resize": "lanczos"}
    assert Preprocessing.from_dict(old).resize == "squash"
    with pytest.raises(ValueError, match="resize must be one of squash, crop, pad"):
        Preprocessing(channels=1, image_size=28, resize="stretch")


def test_a_checkpoint_carries_its_resize_policy_into_the_export(tmp_path):
    from fewshot.inference.checkpoints import read_model
    from fewshot.models import Conv4
    from fewshot.training.module import MetaLearner

    model = MetaLearner(Conv4(3, 4, 28), ways=3)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "datamodule_hyper_parameters": {"dataset": "folder", "image_size": 28,
                                                "channels": 3, "resize": "pad"}},
               tmp_path / "model.ckpt")
    assert read_model(tmp_path / "model.ckpt").metadata["preprocessing"]["resize"] == "pad"
