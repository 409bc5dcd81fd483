"""Loading: the seeded epoch order and views, the bounded cache of decoded images, the uint8
path that must give the tutorial's input bit for bit, and checkpoints that save the same
tensors to the same bytes."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from imagefolders import preprocess, tutorial_transform
from PIL import Image

from transfer import images
from transfer.checkpoints import CheckpointMeta, save_checkpoint
from transfer.datasets import EpochSampler, TrainImages, ValImages
from transfer.errors import UserError
from transfer.imagefolder import image_folders
from transfer.images import ImageCache, decode
from transfer.preprocess import IMAGENET, ModelInput

CPU = torch.device("cpu")


def write_photos(folder: Path, sizes: list[tuple[int, int]], fmt: str = "JPEG") -> list[str]:
    """Noisy pictures of the given sizes; odd sizes exercise the resize's rounding."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (width, height) in enumerate(sizes):
        pixels = np.random.default_rng(i).integers(0, 256, (height, width, 3), dtype=np.uint8)
        path = folder / f"photo_{i}.{fmt.lower()}"
        Image.fromarray(pixels).save(path, format=fmt)
        paths.append(str(path))
    return paths


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    """An image-folder data set of JPEGs with odd sizes and both orientations."""
    sizes = [(317, 211), (211, 317), (500, 375), (260, 260), (301, 299)]
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            write_photos(tmp_path / split / cls, sizes)
    return tmp_path


def test_epoch_order_follows_seed_and_epoch_only() -> None:
    """Epoch e's shuffle is the same in any run (resumed, or with other loader settings),
    differs between epochs and seeds, and covers every sample once."""
    def order(seed: int, epoch: int) -> list[tuple[int, int]]:
        sampler = EpochSampler(50, seed=seed, shuffle=True, cycle=None)
        sampler.set_epoch(epoch)
        return list(sampler)

    first = order(1, 3)
    assert sorted(index for _, index in first) == list(range(50))
    torch.manual_seed(123)  # torch's global generator plays no part
    assert order(1, 3) == first
    assert order(1, 4) != first and order(2, 3) != first
    assert {view for view, _ in first} == {2}  # a fresh view per epoch: epoch 3 -> view 2


@pytest.mark.parametrize(("cycle", "views"), [(None, [0, 1, 2, 3, 4]), (2, [0, 1, 0, 1, 0]), (1, [0] * 5)])
def test_views_by_epoch(cycle: int | None, views: list[int]) -> None:
    """None: a new view every epoch (fine-tuning); N: stored views reused in turn; 1: always one."""
    sampler = EpochSampler(3, seed=0, shuffle=False, cycle=cycle)
    seen = []
    for epoch in range(1, 6):
        sampler.set_epoch(epoch)
        pairs = list(sampler)
        assert [index for _, index in pairs] == [0, 1, 2]
        seen.append(pairs[0][0])
    assert seen == views


def test_cache_keeps_images_up_to_its_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoded images are kept while they fit the budget; past it they are decoded again on
    each access (the latest one excepted), and every access returns the same pixels."""
    paths = write_photos(tmp_path, [(100, 80)] * 5, fmt="PNG")
    one = 100 * 80 * 3
    cache = ImageCache(paths, lambda image: image, budget_bytes=2 * one + 10)
    cache.fill("test")
    assert sorted(cache.arrays) == [0, 1] and cache.used == 2 * one
    loads = []
    monkeypatch.setattr(images, "decode", lambda path: loads.append(paths.index(path)) or decode(path))
    for index in (0, 1, 3, 3, 4, 3):
        assert np.array_equal(cache.get(index), np.asarray(decode(paths[index])))
    assert loads == [3, 4, 3], "cached images are not decoded again; past the budget, only the latest is kept"
    assert sorted(cache.arrays) == [0, 1] and cache.used <= cache.budget
    nothing = ImageCache(paths, lambda image: image, budget_bytes=0)
    nothing.fill("test")
    assert nothing.arrays == {} and nothing.get(2).shape == (80, 100, 3)


def test_validation_input_is_the_tutorials_bit_for_bit(folders: Path) -> None:
    """uint8 crop (cached), then ``ModelInput`` on the device, equals ``ToTensor()`` +
    ``Normalize()`` of the tutorial's PIL pipeline exactly, for every size and orientation."""
    split = image_folders(folders)["val"]
    for pre in (IMAGENET, preprocess(40, 32, "bicubic", [0.5, 0.4, 0.3], [0.2, 0.25, 0.3])):
        dataset = ValImages(split, pre, cache_bytes=10**9)
        dataset.images.fill("test")
        reference = tutorial_transform(pre)
        for index, path in enumerate(split.paths):
            pixels, label = dataset[(0, index)]
            assert pixels.dtype == torch.uint8 and label == split.labels[index]
            ours = ModelInput(pre, CPU)(pixels.unsqueeze(0))[0]
            assert torch.equal(ours, reference(decode(path))), path


def test_training_views_without_augmentation_are_the_validation_crop(folders: Path) -> None:
    """``augment=False`` (feature_extract with ``views: 0``) feeds each training image as
    validation does; with augmentation, views differ by view index and are reproducible."""
    split = image_folders(folders)["train"]
    plain = TrainImages(split, IMAGENET, seed=0, cache_bytes=0, augment=False)
    val_like = ValImages(split, IMAGENET, cache_bytes=0)
    augmented = TrainImages(split, IMAGENET, seed=0, cache_bytes=10**9)
    torch.manual_seed(999)  # the views follow the seed, not torch's global generator
    again = TrainImages(split, IMAGENET, seed=0, cache_bytes=0)
    for index in range(len(split)):
        assert torch.equal(plain[(5, index)][0], val_like[(0, index)][0])
        assert torch.equal(augmented[(1, index)][0], again[(1, index)][0])
        assert not torch.equal(augmented[(1, index)][0], augmented[(2, index)][0])


def test_checkpoints_are_byte_identical_for_identical_tensors(tmp_path: Path) -> None:
    """Saving the same state twice (to different places, at different times) writes the same
    bytes, so DVC sees an unchanged model as unchanged; no temporary file name is recorded."""
    state = {"w": torch.randn(4, 3), "b": torch.arange(3)}
    meta = CheckpointMeta(strategy="finetune", arch="resnet18", classes=["ants", "bees"], head="fc", epoch=1,
                          val_acc=0.5, weights="none", weights_source="none", weights_sha256=None, preprocess=IMAGENET,
                          params_digest="0")
    save_checkpoint(tmp_path / "a" / "model.pt", state, meta)
    save_checkpoint(tmp_path / "b" / "model.pt", {k: v.clone() for k, v in state.items()}, meta)
    first, second = (tmp_path / "a" / "model.pt").read_bytes(), (tmp_path / "b" / "model.pt").read_bytes()
    assert first == second
    names = zipfile.ZipFile(io.BytesIO(first)).namelist()
    assert all(name.startswith("archive/") for name in names), names
    loaded = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert (tmp_path / "a" / "model.json").read_bytes() == (tmp_path / "b" / "model.json").read_bytes()


def test_links_to_folders_are_not_followed(folders: Path) -> None:
    """A loop of links inside the data (a class folder linked to its split, a link from a class
    folder to the top) does not list any image twice: links to folders are not followed."""
    before = {split: (s.classes, s.samples) for split, s in image_folders(folders).items()}
    for split in ("train", "val"):
        (folders / split / "again").symlink_to(".")
        (folders / split / "ants" / "top").symlink_to("../..")
    after = {split: (s.classes, s.samples) for split, s in image_folders(folders).items()}
    assert after == before and len(after["train"][1]) == 10


def test_class_folders_spelled_two_ways(folders: Path) -> None:
    """'bees' composed in train/ and decomposed in val/ print alike: refused with both
    spellings and their code points, not as two different classes."""
    (folders / "train" / "bees").rename(folders / "train" / "b\u00e9es")
    (folders / "val" / "bees").rename(folders / "val" / "be\u0301es")
    with pytest.raises(UserError) as info:
        image_folders(folders)
    assert "'be\\u0301es' (U+0062 U+0065 U+0301 U+0065 U+0073) in val/ and 'b\\xe9es' (U+0062 U+00E9 U+0065 U+0073) " \
        "in train/" in str(info.value), info.value
