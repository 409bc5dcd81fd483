"""Image-folder data sets, indexed by ``(view, index)`` pairs whose order and view follow the
seed and the epoch (:class:`EpochSampler`), never the process that happens to load them: the
same seed gives the same batches with any number of loader workers, and training on the stored
features sees exactly the batches training on the images would.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms import functional as F

from transfer.augment import augmented_view
from transfer.imagefolder import Split
from transfer.images import ImageCache
from transfer.interrupts import quiet_loader_worker
from transfer.preprocess import Preprocess, val_crop

#: How loader workers start: forked on Linux, also from Python 3.14 (whose default is
#: forkserver), to share the images the main process decoded; elsewhere Python's default,
#: spawn, which pickles the data sets to each worker (docs/platforms.md).
WORKER_START = "fork" if sys.platform == "linux" else None

Pair = tuple[int, int]  #: (view, index)


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (``"shuffle", seed, epoch``), stable across processes."""
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


class EpochSampler(Sampler[Pair]):
    """Yields ``(view, index)`` for every sample of one epoch (:meth:`set_epoch` first).
    ``shuffle``: seeded by ``(seed, epoch)``, so a resumed run sees the same order; ``cycle``:
    epoch ``e`` uses view ``(e - 1) % cycle``, None a new view every epoch."""

    def __init__(self, size: int, *, seed: int, shuffle: bool, cycle: int | None) -> None:
        self.size, self.seed, self.shuffle, self.cycle = size, seed, shuffle, cycle
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[Pair]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(derived_seed("shuffle", self.seed, self.epoch))
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = range(self.size)
        view = self.epoch - 1 if self.cycle is None else (self.epoch - 1) % self.cycle
        return ((view, index) for index in order)


class Labelled(Dataset[tuple[torch.Tensor, int]]):
    """Samples and their ``labels``, one each."""

    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)


class TrainImages(Labelled):
    """``(view, index)`` -> view ``view`` of training image ``index`` (seeded random crop and
    flip) as uint8 CHW pixels, and its label; ``augment=False`` gives the validation crop."""

    def __init__(self, split: Split, pre: Preprocess, *, seed: int, cache_bytes: int, augment: bool = True) -> None:
        self.labels = split.labels
        self.pre, self.seed, self.augment = pre, seed, augment
        self.images = ImageCache(split.paths, None, cache_bytes)

    def __getitem__(self, key: Pair) -> tuple[torch.Tensor, int]:
        view, index = key
        image = Image.fromarray(self.images.get(index))
        out = augmented_view(image, self.pre, self.seed, view, index) if self.augment else val_crop(image, self.pre)
        return F.pil_to_tensor(out), self.labels[index]


class ValImages(Labelled):
    """``(view, index)`` -> the validation crop of image ``index`` (uint8 CHW) and its label;
    the crop is fixed, so the cache holds it rather than the whole image."""

    def __init__(self, split: Split, pre: Preprocess, *, cache_bytes: int) -> None:
        self.labels = split.labels
        self.images = ImageCache(split.paths, functools.partial(val_crop, pre=pre), cache_bytes)

    def __getitem__(self, key: Pair) -> tuple[torch.Tensor, int]:
        _, index = key
        return torch.from_numpy(self.images.get(index)).permute(2, 0, 1), self.labels[index]


class FeatureViews(Labelled):
    """``(view, index)`` -> the stored backbone output of view ``view`` of sample ``index``, from
    an array (views, samples, ...), memory-mapped and read a batch at a time."""

    def __init__(self, features: np.ndarray, labels: list[int]) -> None:
        self.features, self.labels = features, labels

    def __getitem__(self, key: Pair) -> tuple[torch.Tensor, int]:
        view, index = key
        return torch.tensor(self.features[view, index]), self.labels[index]  # a copy, off the memory map


def loader_options(workers: int, device: torch.device) -> dict[str, object]:
    """Pinned memory for non-blocking copies to CUDA; workers that end quietly on Ctrl-C and
    SIGTERM (leaving the message to the main process), started as :data:`WORKER_START` says."""
    return {"num_workers": workers, "pin_memory": device.type == "cuda", "persistent_workers": workers > 0,
            "worker_init_fn": quiet_loader_worker,
            "multiprocessing_context": WORKER_START if workers else None}


def ordered_loader(dataset: Labelled, pairs: Sequence[Pair], *, batch_size: int,
                   workers: int, device: torch.device) -> DataLoader:
    """A loader over ``pairs`` in their order, for passes that only predict."""
    return DataLoader(dataset, batch_size=batch_size, sampler=pairs, **loader_options(workers, device))  # type: ignore[arg-type]
