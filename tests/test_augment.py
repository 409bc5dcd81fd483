"""The seeded augmentation: torchvision's ``RandomResizedCrop`` + ``RandomHorizontalFlip``, with
the randomness drawn from ``(seed, view, image)`` so that it does not depend on which process
(or how many DataLoader workers) prepares an image."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import torch
from imagefolders import preprocess
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

from transfer.augment import RATIO, SCALE, Crop, apply_crop, augmented_view, sample_crop
from transfer.preprocess import IMAGENET


def photo(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    """A noisy RGB picture, so that any two different crops give different pixels."""
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def test_a_drawn_box_is_applied_as_torchvision_applies_it() -> None:
    """Given the same box, the pixels are torchvision's: ``RandomResizedCrop(224)`` (bilinear)
    then a flip, bit for bit. torchvision draws its box from torch's global generator; the
    test replays that draw to get the same box."""
    image = photo()
    crop = transforms.RandomResizedCrop(IMAGENET.crop)
    for seed in range(5):
        torch.manual_seed(seed)
        top, left, height, width = transforms.RandomResizedCrop.get_params(image, list(crop.scale), list(crop.ratio))
        torch.manual_seed(seed)
        expected = crop(image)
        for flip in (False, True):
            ours = apply_crop(image, Crop(top, left, height, width, flip), IMAGENET)
            reference = transforms.functional.hflip(expected) if flip else expected
            assert torch.equal(F.pil_to_tensor(ours), F.pil_to_tensor(reference))


def test_boxes_follow_torchvisions_distribution() -> None:
    """Over many draws, the crop's share of the area, its aspect ratio and the flip rate have
    the distribution of torchvision's (4,000 draws each; means within a few standard errors)."""
    image = photo(500, 375)
    ours = [sample_crop(random.Random(i), image.width, image.height) for i in range(4000)]
    torch.manual_seed(0)
    theirs = [transforms.RandomResizedCrop.get_params(image, list(SCALE), list(RATIO)) for _ in range(4000)]

    def area(height: int, width: int) -> float:
        return height * width / (image.width * image.height)

    our_areas = [area(c.height, c.width) for c in ours]
    their_areas = [area(h, w) for _, _, h, w in theirs]
    assert statistics.mean(our_areas) == pytest.approx(statistics.mean(their_areas), abs=0.02)
    assert statistics.stdev(our_areas) == pytest.approx(statistics.stdev(their_areas), abs=0.02)
    our_ratios = [math.log(c.width / c.height) for c in ours]
    their_ratios = [math.log(w / h) for _, _, h, w in theirs]
    assert statistics.mean(our_ratios) == pytest.approx(statistics.mean(their_ratios), abs=0.02)
    assert sum(c.flip for c in ours) / len(ours) == pytest.approx(0.5, abs=0.03)
    for c in ours:
        assert 0 <= c.top <= image.height - c.height and 0 <= c.left <= image.width - c.width
        assert SCALE[0] - 0.01 <= area(c.height, c.width) <= SCALE[1]


@pytest.mark.parametrize(("width", "height", "expected"), [(1000, 10, (0, 493, 10, 13)), (10, 1000, (493, 0, 13, 10))])
def test_extreme_shapes_fall_back_to_a_centre_crop(width: int, height: int, expected: tuple[int, ...]) -> None:
    """No valid box in ten tries: a centre crop of the nearest allowed aspect ratio (a
    1000x10 strip gives a 13x10 box in its middle), the box torchvision returns too."""
    box = sample_crop(random.Random(0), width, height)
    assert (box.top, box.left, box.height, box.width) == expected
    torch.manual_seed(0)
    assert transforms.RandomResizedCrop.get_params(photo(width, height), list(SCALE), list(RATIO)) == expected


def test_views_depend_on_seed_view_and_image_only() -> None:
    """The same (seed, view, image) is the same picture in any order; changing any of the
    three changes it. (String seeds are hashed with SHA-512, not Python's per-process hash(),
    so other processes draw the same: the train stage's test with 1 and 2 loader workers
    shows it.)"""
    image, pre = photo(), preprocess(64, 48, "bilinear", IMAGENET.mean, IMAGENET.std)

    def view(seed: int, v: int, index: int) -> torch.Tensor:
        return F.pil_to_tensor(augmented_view(image, pre, seed, v, index))

    first = view(42, 3, 7)
    for _ in range(3):
        random.seed(999)  # the global generators play no part
        torch.manual_seed(999)
        assert torch.equal(view(42, 3, 7), first)
    assert first.shape == (3, 48, 48)
    for other in (view(43, 3, 7), view(42, 4, 7), view(42, 3, 8)):
        assert not torch.equal(other, first)
