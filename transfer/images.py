"""Reading images: one decoder for every stage, and a memory-bounded cache of decoded images.

:func:`decode` is the only place that opens an image file, so unzip's validity check,
training, the features, evaluation's figures, the preview and ``stages.predict`` all see the
same pixels, and they are the pixels an image viewer shows: upright (EXIF orientation),
transparent areas on white, 16-bit images scaled rather than clipped.

Decoding a JPEG costs more than cropping and resizing it, and the tutorial's loop decodes
every image again every epoch. :class:`ImageCache` decodes each image once per run and keeps
the pixels (uint8) in memory up to a budget (``runtime.image_cache_mb``); images past the
budget are decoded again when needed, so memory stays bounded whatever the data set's size.
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

#: What transparent pixels are laid on: white, as browsers and image viewers show them on
#: a page. Dropping the alpha channel instead shows whatever colour the transparent pixels
#: happen to store, usually black.
BACKGROUND = (255, 255, 255)

#: Modes whose pixels are integers beyond 8 bits: 16-bit greyscale PNG and TIFF (``I;16*``),
#: and ``I``, which older Pillows and some TIFFs use for the same data.
WIDE_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class ImageTooLarge(Exception):
    """The image has more pixels than Pillow's decompression-bomb limit; the message says
    how many, and the limit."""


def decode(source: str | Path | IO[bytes]) -> Image.Image:
    """The image in ``source`` as a viewer shows it, as RGB, fully loaded (a file opened
    here is closed on return).

    Raises :class:`ImageTooLarge` when the pixel count reaches Pillow's decompression-bomb
    check, at its *warning* level (``Image.MAX_IMAGE_PIXELS``, about 89 million pixels) and
    not only at its error level (twice that): every stage holds whole decoded images in
    memory, 3 bytes a pixel (270 MB at the limit) for a network that looks at 224x224, so
    such a file is far more likely a bomb or a mistake than a training image. Unzip and
    predict apply the same rule because they call this same function, so an image that
    unzip accepted never fails later in training. Any other decoding failure raises what
    Pillow raises.
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
    """``image`` in RGB, converted as a viewer displays it.

    - 16-bit (and 32-bit integer) greyscale: scaled to 8 bits (:func:`wide_grey_to_l`), where
      Pillow's own conversion clips every value above 255 to white;
    - anything with transparency (an alpha channel, or a palette or single colour marked
      transparent): composited on :data:`BACKGROUND`;
    - 1-bit: black and white, through greyscale;
    - the rest (RGB, L, P, CMYK, YCbCr...): Pillow's conversion.
    """
    if image.mode in WIDE_GREY_MODES:
        image = wide_grey_to_l(image)
    if image.has_transparency_data:
        return on_background(image)
    if image.mode == "1":
        image = image.convert("L")
    return image.convert("RGB")


def wide_grey_to_l(image: Image.Image) -> Image.Image:
    """16-bit greyscale to 8 bits by the fixed full-range scale ``value / 257`` (65535 -> 255),
    rounded; ``I`` values outside 0-65535 are clipped first.

    Why the fixed scale rather than stretching each image's own minimum and maximum to
    0-255: it is what image viewers do, so the model sees what the user sees; the same
    16-bit value gives the same grey in every image, so brightness keeps its meaning across
    a data set (a per-image stretch would make an under-exposed scan look like a normal
    one); and a pixel's value does not depend on the rest of the image. Data that uses only
    part of the range (12-bit scans stored in 16 bits) therefore comes out dark, as it does
    in a viewer, but with its contrast: no two levels more than 257 apart merge.
    """
    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    return Image.fromarray(((values + 128) // 257).astype(np.uint8))  # uint8, 2-D: mode L


def on_background(image: Image.Image) -> Image.Image:
    """``image`` (with an alpha channel or transparency info) laid on :data:`BACKGROUND`."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


class ImageCache:
    """``prepare(decode(paths[i]))`` as a uint8 HWC array, computed once per image while the
    cached arrays fit in ``budget_bytes``; later images are prepared again on each access.

    Fill it (:meth:`fill`) in the main process before DataLoader workers start: forked
    workers then share the arrays instead of each decoding its own copy.
    """

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
        """What a loader worker started by spawn (macOS, Windows) receives: the paths and the
        budget, not the decoded images, which it decodes and caches itself; copying the whole
        cache through a pipe to every worker would cost more. Forked workers share the
        parent's arrays instead (see :data:`transfer.data.WORKER_START`)."""
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
