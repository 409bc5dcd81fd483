"""Reading images: the one decoder every stage uses, so that all of them (and predict) see the
pixels an image viewer shows (docs/data-and-models.md), and a memory-bounded cache of them:
decoding costs more than cropping, and the tutorial decodes every image again every epoch.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

#: What transparent pixels are laid on, as viewers show them (dropping the alpha channel shows
#: whatever colour they happen to store, usually black).
BACKGROUND = (255, 255, 255)

#: 16-bit greyscale PNG and TIFF (``I;16*``), and ``I``, which older Pillows and some TIFFs use.
WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class ImageTooLarge(Exception):
    """More pixels than Pillow's decompression-bomb limit; the message says how many."""


def decode(source: str | Path | IO[bytes]) -> Image.Image:
    """The image in ``source`` as a viewer shows it, as RGB, fully loaded.

    Raises :class:`ImageTooLarge` already at Pillow's *warning* level (about 89 million
    pixels): every stage holds whole decoded images in memory (270 MB at the limit) for a
    network that looks at 224x224, so such a file is likelier a bomb or a mistake than a
    training image; unzip applies this same rule, so an image it kept never fails in training.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                ImageOps.exif_transpose(image, in_place=True)  # no copy for the usual upright image
                return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(_too_large(exc)) from None


def _too_large(exc: Exception) -> str:
    """A one-line reason from Pillow's bomb message, whose wording may change: the pixel
    count is shown when it can be found in it."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    count = f"{int(found.group(1)):,} pixels, " if found else ""
    return (f"too large to decode safely: {count}over the {Image.MAX_IMAGE_PIXELS:,} pixels of "
            "Pillow's decompression-bomb check (downscale it if it is a genuine image)")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB as a viewer shows it, where Pillow's own conversion differs: 16-bit
    greyscale scaled (Pillow clips it to white), transparency laid on white, 1-bit through L."""
    if image.mode in WIDE_GREY_MODES:
        image = wide_grey_to_l(image)
    if image.has_transparency_data:
        return on_background(image)
    if image.mode == "1":
        image = image.convert("L")
    return image.convert("RGB")


def wide_grey_to_l(image: Image.Image) -> Image.Image:
    """16-bit greyscale to 8 bits by the fixed scale ``value / 257``, rounded (``I`` clipped to
    0-65535 first). Fixed, not each image's own range: it is what viewers do, and a grey then
    means the same brightness in every image of a data set."""
    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    return Image.fromarray(((values + 128) // 257).astype(np.uint8))  # uint8, 2-D: mode L


def on_background(image: Image.Image) -> Image.Image:
    """``image`` (with an alpha channel or transparency info) laid on :data:`BACKGROUND`."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


class ImageCache:
    """``prepare(decode(paths[i]))`` as a uint8 HWC array, kept while the arrays fit in
    ``budget_bytes`` (later images are prepared again on each access). Filled before loader
    workers start, it is shared by forked workers instead of decoded by each."""

    def __init__(self, paths: Sequence[str], prepare: Callable[[Image.Image], Image.Image] | None,
                 budget_bytes: int) -> None:
        self.paths = list(paths)
        self.prepare = prepare
        self.budget = budget_bytes
        self.used = 0
        self.arrays: dict[int, np.ndarray] = {}
        self.last: tuple[int, np.ndarray] | None = None  # past the budget: the latest image only

    def __len__(self) -> int:
        return len(self.paths)

    def __getstate__(self) -> dict[str, object]:
        """What a worker started by spawn (macOS) receives: not the images, which it decodes and
        caches itself, cheaper than copying the whole cache through a pipe to every worker."""
        return {**self.__dict__, "arrays": {}, "used": 0, "last": None}

    def load(self, index: int) -> np.ndarray:
        image = decode(self.paths[index])
        return np.array(self.prepare(image) if self.prepare else image)  # a writable copy, as torch wants

    def fill(self, desc: str) -> None:
        """Decode images in order until the budget is spent, with a progress bar."""
        for index in tqdm(range(len(self)), desc=desc, unit="image", leave=False, disable=None):
            if self.used >= self.budget:
                break
            self.get(index)

    def get(self, index: int) -> np.ndarray:
        """The prepared pixels of image ``index``. Past the budget the latest image is kept
        too, so several views of one image in a row decode it once."""
        array = self.arrays.get(index)
        if array is not None:
            return array
        if self.last is not None and self.last[0] == index:
            return self.last[1]
        array = self.load(index)
        if self.used + array.nbytes <= self.budget:
            self.arrays[index] = array
            self.used += array.nbytes
        else:
            self.last = (index, array)
        return array

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.get(index))
