"""Reading images: one decoder for every stage, and a memory-bounded cache of decoded images.

Decoding a JPEG costs more than cropping and resizing it, and the tutorial's loop decodes
every image again every epoch. :class:`ImageCache` decodes each image once per run and keeps
the pixels (uint8) in memory up to a budget (``runtime.image_cache_mb``); images past the
budget are decoded again when needed, so memory stays bounded whatever the data set's size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm


def decode(path: str | Path) -> Image.Image:
    """The image at ``path`` as RGB, fully loaded (the file is closed on return)."""
    with Image.open(path) as image:
        return image.convert("RGB")


class ImageCache:
    """``prepare(decode(paths[i]))`` as a uint8 HWC array, computed once per image while the
    cached arrays fit in ``budget_bytes``; later images are prepared again on each access.

    Fill it (:meth:`fill`) in the main process before DataLoader workers start: forked
    workers then share the arrays instead of each decoding its own copy.
    """

    def __init__(self, paths: Sequence[str], prepare: Callable[[Image.Image], Image.Image],
                 budget_bytes: int) -> None:
        self.paths = list(paths)
        self.prepare = prepare
        self.budget = budget_bytes
        self.used = 0
        self.arrays: dict[int, np.ndarray] = {}
        self.last: tuple[int, np.ndarray] | None = None  # past the budget: the latest image only

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> np.ndarray:
        return np.array(self.prepare(decode(self.paths[index])))  # a writable copy, as torch wants

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
