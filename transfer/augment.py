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


def view_rng(seed: int, view: int, index: int) -> random.Random:
    """The random source of view ``view`` of image ``index``. String seeds are hashed with
    SHA-512, so the stream is the same on every platform and Python process."""
    return random.Random(f"augment:{seed}:{view}:{index}")


def sample_crop(rng: random.Random, width: int, height: int) -> Crop:
    """A ``RandomResizedCrop`` box (and the flip) for a ``width`` x ``height`` image."""
    area = width * height
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = rng.randint(0, height - h), rng.randint(0, width - w)
            return Crop(top, left, h, w, rng.random() < 0.5)
    # Fall back to a centre crop whose aspect ratio is the closest one allowed.
    if width / height < RATIO[0]:
        w, h = width, round(width / RATIO[0])
    elif width / height > RATIO[1]:
        w, h = round(height * RATIO[1]), height
    else:
        w, h = width, height
    return Crop((height - h) // 2, (width - w) // 2, h, w, rng.random() < 0.5)


def apply_crop(image: Image.Image, box: Crop, pre: Preprocess) -> Image.Image:
    """What ``RandomResizedCrop(pre.crop)`` and ``RandomHorizontalFlip`` do once they drew ``box``."""
    out = F.resized_crop(image, box.top, box.left, box.height, box.width, [pre.crop, pre.crop],
                         interpolation=INTERPOLATIONS[pre.interpolation])
    return F.hflip(out) if box.flip else out


def augmented_view(image: Image.Image, pre: Preprocess, seed: int, view: int, index: int) -> Image.Image:
    """View ``view`` of image ``index``: its seeded random crop, resized to ``pre.crop``, maybe flipped."""
    return apply_crop(image, sample_crop(view_rng(seed, view, index), image.width, image.height), pre)
