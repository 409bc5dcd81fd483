"""The tutorial's training augmentation, ``RandomResizedCrop`` + ``RandomHorizontalFlip``, with
torchvision's distribution but its randomness drawn from ``(seed, view, image)``: torchvision
draws from the global generator, so a crop would depend on which loader worker loaded the
image. Here view ``v`` of image ``i`` is the same in any process, so the features stage can
compute the frozen backbone's output of the very views fine-tuning trains on.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple

from PIL import Image
from torchvision.transforms import functional as F

from transfer.preprocess import INTERPOLATIONS, Preprocess

SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


class Crop(NamedTuple):
    top: int
    left: int
    height: int
    width: int
    flip: bool


def sample_crop(rng: random.Random, width: int, height: int) -> Crop:
    """A ``RandomResizedCrop`` box (and the flip) for a ``width`` x ``height`` image."""
    for _ in range(10):
        target_area = width * height * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*map(math.log, RATIO)))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return Crop(rng.randint(0, height - h), rng.randint(0, width - w), h, w, rng.random() < 0.5)
    # Fall back to a centre crop whose aspect ratio is the closest one allowed.
    w, h = width, height
    if width / height < RATIO[0]:
        h = round(width / RATIO[0])
    elif width / height > RATIO[1]:
        w = round(height * RATIO[1])
    return Crop((height - h) // 2, (width - w) // 2, h, w, rng.random() < 0.5)


def apply_crop(image: Image.Image, box: Crop, pre: Preprocess) -> Image.Image:
    """What ``RandomResizedCrop(pre.crop)`` and ``RandomHorizontalFlip`` do once they drew ``box``."""
    out = F.resized_crop(image, box.top, box.left, box.height, box.width, [pre.crop, pre.crop],
                         interpolation=INTERPOLATIONS[pre.interpolation])
    return F.hflip(out) if box.flip else out


def augmented_view(image: Image.Image, pre: Preprocess, seed: int, view: int, index: int) -> Image.Image:
    """View ``view`` of image ``index``: its seeded random crop, resized to ``pre.crop``, maybe flipped."""
    # A string seed is hashed with SHA-512: the same stream on every platform and in every process.
    rng = random.Random(f"augment:{seed}:{view}:{index}")
    return apply_crop(image, sample_crop(rng, image.width, image.height), pre)
