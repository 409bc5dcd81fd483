"""Image-folder data sets and their loaders, with randomness that follows the seed, the epoch
and the image, never the process that happens to do the work.

Every data set here is indexed by ``(view, index)`` pairs, which :class:`EpochSampler`
yields: the epoch decides the order (a seeded shuffle) and the view (a fresh augmentation
per epoch, a cached view in turn, or always the same one). So the same seed gives the same
batches with any number of DataLoader workers, and training on precomputed features sees
exactly the batches that training on images would.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import datasets

from transfer.augment import augmented_view
from transfer.distributed import IGNORE, World
from transfer.errors import UserError
from transfer.images import ImageCache
from transfer.interrupts import quiet_loader_worker
from transfer.layout import SPLITS, is_image_name, layout_problem
from transfer.preprocess import Preprocess, to_uint8_tensor, val_crop

#: How loader workers start. Forked on Linux (on purpose, also from Python 3.14, whose default
#: is forkserver): they then share the decoded images the main process cached. Elsewhere
#: (macOS, Windows) Python's default, spawn: the datasets are pickled to each worker, which
#: decodes and caches images itself.
WORKER_START = "fork" if sys.platform == "linux" else None


@dataclass(frozen=True)
class Split:
    """One split of an image-folder data set: sorted class names and (path, label) samples,
    in torchvision ``ImageFolder``'s order."""

    classes: list[str]
    samples: list[tuple[str, int]]

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.samples]

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)


def image_folders(root: Path) -> dict[str, Split]:
    """``train`` and ``val`` of ``root``; classes are the sorted folder names of train/."""
    counts = {
        split: {
            folder.name: sum(1 for f in folder.rglob("*") if f.is_file() and is_image_name(f.name))
            for folder in (root / split).iterdir() if folder.is_dir()
        }
        for split in SPLITS
        if (root / split).is_dir()
    }
    problem = layout_problem(counts)
    if problem:
        raise UserError(f"{root} is not an image-folder data set: {problem}")
    folders = {split: datasets.ImageFolder(str(root / split)) for split in SPLITS}
    return {split: Split(folder.classes, list(folder.samples)) for split, folder in folders.items()}


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (``"shuffle", seed, epoch``), stable across processes."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields ``(view, index)`` for every sample of one epoch; call :meth:`set_epoch` first.

    ``shuffle``: a permutation seeded by ``(seed, epoch)``, so epoch ``e`` has the same order
    in any run, resumed or not. ``cycle``: epoch ``e`` uses view ``(e - 1) % cycle``; None
    gives a new view every epoch (``e - 1``), 1 always view 0.
    """

    def __init__(self, size: int, *, seed: int, shuffle: bool, cycle: int | None) -> None:
        self.size, self.seed, self.shuffle, self.cycle = size, seed, shuffle, cycle
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def view(self) -> int:
        return self.epoch - 1 if self.cycle is None else (self.epoch - 1) % self.cycle

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(derived_seed("shuffle", self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = range(self.size)
        view = self.view
        return iter([(view, index) for index in order])


class ShardedBatches(Sampler[list[tuple[tuple[int, int], bool]]]):
    """This process's share of each batch of ``sampler``'s epoch, for several processes
    training as one: global batch ``s`` holds the pairs a single process would batch
    together, split in contiguous shares (see :mod:`transfer.distributed`).

    Yields ``(pair, real)`` lists for :class:`Shard`. A process whose share of a step is empty
    gets the step's first pair with ``real`` False, so that it takes part in every step.
    """

    def __init__(self, sampler: EpochSampler, batch_size: int, world: World) -> None:
        self.sampler, self.batch_size, self.world = sampler, batch_size, world

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[tuple[int, int], bool]]]:
        pairs = list(self.sampler)
        for start in range(0, len(pairs), self.batch_size):
            step = pairs[start:start + self.batch_size]
            share = self.world.share(step)
            yield [(pair, True) for pair in share] if share else [(step[0], False)]


class Shard(Dataset[tuple[torch.Tensor, int]]):
    """``(pair, real)`` -> the item of ``dataset``, labelled :data:`IGNORE` where not ``real``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[tuple[int, int], bool]) -> tuple[torch.Tensor, int]:
        pair, real = key
        data, label = self.dataset[pair]
        return data, label if real else IGNORE


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell ``loader``'s sampler (or batch sampler) which epoch comes: it decides order and views."""
    for sampler in (loader.batch_sampler, loader.sampler):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            return


class TrainImages(Dataset[tuple[torch.Tensor, int]]):
    """``(view, index)`` -> view ``view`` of training image ``index`` (seeded random crop and
    flip) as uint8 CHW pixels, and its label; ``augment=False`` gives the validation crop."""

    def __init__(self, split: Split, pre: Preprocess, *, seed: int, cache_bytes: int, augment: bool = True) -> None:
        self.labels = split.labels
        self.pre, self.seed, self.augment = pre, seed, augment
        self.images = ImageCache(split.paths, None, cache_bytes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        view, index = key
        image = self.images.image(index)
        out = augmented_view(image, self.pre, self.seed, view, index) if self.augment else val_crop(image, self.pre)
        return to_uint8_tensor(out), self.labels[index]


class ValImages(Dataset[tuple[torch.Tensor, int]]):
    """``(view, index)`` -> the validation crop of image ``index`` (uint8 CHW) and its label.

    The crop is deterministic, so the cache holds it, already cropped, rather than the
    decoded image: each image is decoded and resized once per run, not once per epoch.
    """

    def __init__(self, split: Split, pre: Preprocess, *, cache_bytes: int) -> None:
        self.labels = split.labels
        self.images = ImageCache(split.paths, functools.partial(val_crop, pre=pre), cache_bytes)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        _, index = key
        return torch.from_numpy(self.images.get(index)).permute(2, 0, 1), self.labels[index]


class FeatureViews(Dataset[tuple[torch.Tensor, int]]):
    """``(view, index)`` -> the stored backbone output of view ``view`` of sample ``index``.

    ``features`` has shape (views, samples, ...); a memory-mapped ``.npy`` array is read
    lazily, one batch at a time.
    """

    def __init__(self, features: np.ndarray, labels: list[int]) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        view, index = key
        return torch.from_numpy(np.array(self.features[view, index])), self.labels[index]


def make_loader(dataset: Dataset, sampler: EpochSampler, *, batch_size: int, workers: int,
                device: torch.device, world: World | None = None) -> DataLoader:
    """A DataLoader over ``sampler``'s pairs in batches of ``batch_size``: with several processes
    (``world``), this process's share of each (:class:`ShardedBatches`). Pinned memory for
    non-blocking copies to CUDA. Its workers end quietly on Ctrl-C and SIGTERM, leaving the
    message to the main process."""
    options = {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0,
               "worker_init_fn": quiet_loader_worker if workers else None,
               "multiprocessing_context": WORKER_START if workers else None}
    if world is not None and world.size > 1:
        return DataLoader(Shard(dataset), batch_sampler=ShardedBatches(sampler, batch_size, world), **options)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **options)
