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


class ImageTooLarge(Exception):
    """More pixels than Pillow's decompression-bomb limit; the message says how many."""


def decode(source: str | Path | IO[bytes]) -> Image.Image:
    """The image in ``source`` as a viewer shows it, as RGB, fully loaded, where Pillow's own
    conversion differs: 16-bit greyscale scaled (Pillow clips it to white), transparency laid
    on white.

    Raises :class:`ImageTooLarge` already at Pillow's *warning* level (about 89 million
    pixels): every stage holds whole decoded images in memory (270 MB at the limit) for a
    network that looks at 224x224, so such a file is likelier a bomb or a mistake than a
    training image; unzip applies this same rule, so an image it kept never fails in training.
    """
    try:
        with warnings.catch_warnings(action="error", category=Image.DecompressionBombWarning), \
                Image.open(source) as image:
            ImageOps.exif_transpose(image, in_place=True)  # no copy for the usual upright image
            # 16-bit greyscale PNG and TIFF (I;16*), and I, which older Pillows and some TIFFs
            # use (no other mode starts with I): to 8 bits by the fixed scale value / 257,
            # rounded (I clipped to 0-65535 first). Fixed, not each image's own range: it is
            # what viewers do, and a grey then means the same brightness in every image.
            if image.mode.startswith("I"):
                values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
                image = Image.fromarray(((values + 128) // 257).astype(np.uint8))  # uint8, 2-D: mode L
            if image.has_transparency_data:
                # Transparent pixels laid on white, as viewers show them (dropping the alpha
                # channel shows whatever colour they happen to store, usually black).
                background = Image.new("RGBA", image.size, "white")
                return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
            return image.convert("RGB")  # 1-bit too: black 0, white 255
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's wording may change: the pixel count is shown when it can be found in it.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        count = f"{int(found.group(1)):,} pixels, " if found else ""
        raise ImageTooLarge(f"too large to decode safely: {count}over the {Image.MAX_IMAGE_PIXELS:,} pixels of "
                            "Pillow's decompression-bomb check (downscale it if it is a genuine image)") from None


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
        self.last: dict[int, np.ndarray] = {}  # past the budget: the latest image only

    def __getstate__(self) -> dict[str, object]:
        """What a worker started by spawn (macOS) receives: not the images, which it decodes and
        caches itself, cheaper than copying the whole cache through a pipe to every worker."""
        return {**self.__dict__, "arrays": {}, "used": 0, "last": {}}

    def fill(self, desc: str) -> None:
        """Decode images in order until the budget is spent, with a progress bar."""
        for index in tqdm(range(len(self.paths)), desc=desc, unit="image", leave=False, disable=None):
            if self.used >= self.budget:
                break
            self.get(index)

    def get(self, index: int) -> np.ndarray:
        """The prepared pixels of image ``index``. Past the budget the latest image is kept
        too, so several views of one image in a row decode it once."""
        array = self.arrays.get(index, self.last.get(index))
        if array is None:
            image = decode(self.paths[index])
            array = np.array(self.prepare(image) if self.prepare else image)  # a writable copy, as torch wants
            if self.used + array.nbytes <= self.budget:
                self.arrays[index] = array
                self.used += array.nbytes
            else:
                self.last = {index: array}
        return array
