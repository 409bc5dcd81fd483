"""Images as users have them: every stage decodes through :func:`transfer.images.decode`,
which must give the pixels an image viewer shows.

Each case is a small file written with Pillow the way cameras, scanners and editors write
it: a phone JPEG whose EXIF says "rotate 90", a 16-bit greyscale PNG, greyscale with alpha,
a palette image with a transparent colour, RGBA, 1-bit, and images past Pillow's
decompression-bomb limit. The data sets the training stages read (:class:`ValImages` for
validation, evaluation and its figures; :class:`TrainImages` for training, the features and
the preview) are checked to see what ``decode`` sees.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import bilevel_png, sideways_jpeg
from imagefolders import preprocess
from PIL import Image

from transfer.datasets import TrainImages, ValImages
from transfer.imagefolder import Split
from transfer.images import ImageTooLarge, decode

RED, BLUE = (230, 20, 20), (20, 20, 230)
#: EXIF tag 0x0112 (Orientation) value 6: the stored pixels must be turned 90 degrees
#: clockwise to be upright, what phones write when held in portrait.


def save(image: Image.Image, path: Path, **options: object) -> Path:
    image.save(path, **options)
    return path


def is_near(pixel: np.ndarray, colour: tuple[int, int, int], tolerance: int = 40) -> bool:
    return bool(np.all(np.abs(pixel.astype(int) - colour) <= tolerance))


# --------------------------------------------------------------------------- EXIF orientation

def test_exif_rotate_90_is_decoded_upright(tmp_path: Path) -> None:
    """The phone photo comes out as viewers show it: portrait, red on top, blue below."""
    path = sideways_jpeg(tmp_path / "phone.jpg", RED, BLUE)
    with Image.open(path) as raw:
        assert raw.size == (64, 32), "the file really stores the picture sideways"
    image = decode(path)
    assert image.mode == "RGB" and image.size == (32, 64)
    pixels = np.asarray(image)
    assert is_near(pixels[4, 16], RED) and is_near(pixels[-5, 16], BLUE)


def test_training_and_validation_images_are_upright(tmp_path: Path) -> None:
    """The data sets of training, features, preview (TrainImages) and of validation,
    evaluation and its figures (ValImages) crop the upright image: red rows above blue rows
    in the centre crop, not red columns beside blue ones."""
    path = sideways_jpeg(tmp_path / "phone.jpg", RED, BLUE)
    split = Split(["ants"], [(str(path), 0)])
    pre = preprocess(20, 16, "bilinear", [0.5] * 3, [0.5] * 3)
    crops = {
        "val": ValImages(split, pre, cache_bytes=2**20)[(0, 0)][0],
        "train, unaugmented": TrainImages(split, pre, seed=0, cache_bytes=0, augment=False)[(0, 0)][0],
    }
    for name, crop in crops.items():
        pixels = crop.permute(1, 2, 0).numpy()  # CHW -> HWC
        assert pixels.shape == (16, 16, 3), name
        assert is_near(pixels[1, 8], RED) and is_near(pixels[-2, 8], BLUE), name
        assert is_near(pixels[1, 1], RED) and is_near(pixels[1, -2], RED), f"{name}: the top row is all red"


# --------------------------------------------------------------------------- 16-bit and other modes

def test_16_bit_greyscale_keeps_its_contrast(tmp_path: Path) -> None:
    """A 16-bit greyscale PNG (mode I;16) is scaled by 257 to 8 bits, as viewers show it:
    its darkest and brightest values map to 0 and 255 and its levels stay distinct, where
    Pillow's plain conversion clips everything above 255 to white."""
    levels = np.array([0, 300, 1000, 5000, 20000, 40000, 60000, 65535], dtype=np.uint16)
    stored = np.tile(levels, (4, 1))
    path = save(Image.fromarray(stored), tmp_path / "scan.png")
    with Image.open(path) as raw:
        assert raw.mode in ("I;16", "I"), raw.mode
    pixels = np.asarray(decode(path))
    assert pixels.shape == (4, len(levels), 3)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all(), "grey"
    expected = np.round(levels / 257).astype(np.uint8)
    assert pixels[0, :, 0].tolist() == expected.tolist() == [0, 1, 4, 19, 78, 156, 233, 255]
    assert len(set(pixels[0, :, 0].tolist())) == len(levels), "no two levels merged"


def test_greyscale_with_alpha_is_laid_on_white(tmp_path: Path) -> None:
    """LA: black pixels that are transparent show as white, half-transparent black as mid
    grey, opaque black as black (dropping the alpha channel made them all black)."""
    grey = np.zeros((4, 6), dtype=np.uint8)
    alpha = np.array([[0, 0, 128, 128, 255, 255]] * 4, dtype=np.uint8)
    path = save(Image.merge("LA", [Image.fromarray(grey), Image.fromarray(alpha)]), tmp_path / "la.png")
    with Image.open(path) as raw:
        assert raw.mode == "LA"
    row = np.asarray(decode(path))[0]
    assert row[0].tolist() == [255, 255, 255]
    assert all(abs(int(v) - 127) <= 1 for v in row[2])
    assert row[5].tolist() == [0, 0, 0]


def test_palette_with_transparent_colour_is_laid_on_white(tmp_path: Path) -> None:
    """P with a transparent palette entry (GIF-style transparency, here in a PNG): that
    entry shows as white, not as the black the palette stores for it; red stays red."""
    image = Image.new("P", (6, 4), 0)
    image.putpalette([0, 0, 0, *RED] + [0, 0, 0] * 254)
    image.paste(1, (3, 0, 6, 4))
    path = save(image, tmp_path / "icon.png", transparency=0)
    with Image.open(path) as raw:
        assert raw.mode == "P" and raw.info.get("transparency") == 0
    row = np.asarray(decode(path))[0]
    assert row[0].tolist() == [255, 255, 255]
    assert row[5].tolist() == list(RED)


def test_rgba_is_laid_on_white(tmp_path: Path) -> None:
    """RGBA: a fully transparent area is white whatever colour it stores."""
    image = Image.new("RGBA", (6, 4), (0, 0, 0, 0))
    image.paste((*BLUE, 255), (3, 0, 6, 4))
    row = np.asarray(decode(save(image, tmp_path / "cutout.png")))[0]
    assert row[0].tolist() == [255, 255, 255] and row[5].tolist() == list(BLUE)


def test_one_bit_is_black_and_white(tmp_path: Path) -> None:
    """Mode 1 (fax, scanned line art): black stays 0 and white becomes 255 in every channel."""
    image = Image.new("1", (6, 4), 0)
    image.paste(1, (3, 0, 6, 4))
    path = save(image, tmp_path / "lineart.png")
    with Image.open(path) as raw:
        assert raw.mode == "1"
    pixels = np.asarray(decode(path))
    assert pixels.dtype == np.uint8 and pixels.shape == (4, 6, 3)
    assert pixels[:, :3].max() == 0 and pixels[:, 3:].min() == 255


# --------------------------------------------------------------------------- decompression bombs

@pytest.mark.parametrize(("size", "level"), [((10_000, 10_000), "warning"), ((14_000, 14_000), "error")])
def test_decompression_bombs_are_refused(size: tuple[int, int], level: str) -> None:
    """Past Pillow's limit (89.5 M pixels) ``decode`` refuses the image before decoding it,
    at the warning level (up to twice the limit) as at the error level; the message gives
    the pixel count and the limit."""
    data = bilevel_png(*size)
    with pytest.raises(ImageTooLarge) as info:
        decode(io.BytesIO(data))
    message = str(info.value)
    assert f"{size[0] * size[1]:,} pixels" in message, level
    assert f"{Image.MAX_IMAGE_PIXELS:,} pixels of Pillow's decompression-bomb check" in message


def test_the_limit_is_pillows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule is Pillow's own setting: an application that raises ``Image.MAX_IMAGE_PIXELS``
    (or lowers it) moves the line for every stage."""
    data = bilevel_png(64, 64)
    assert decode(io.BytesIO(data)).size == (64, 64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    with pytest.raises(ImageTooLarge, match="4,096 pixels, over the 4,095 pixels"):
        decode(io.BytesIO(data))
