"""The frozen backbone's outputs, computed once by the ``features`` stage for the strategies that
train the head alone on them (docs/strategies.md): the tutorial runs every image through the
frozen backbone again every epoch, although only the head changes.

Epoch ``e`` trains on view ``(e - 1) % views`` of each training image, in the batches training
on the images would use; with ``batchnorm: update`` the statistics' trajectory follows those
batches, not the head, so it is computed once too. What is stored is the head's input
(captured by a hook), so any model whose head is its last layer works.

The folder: ``train.npy`` (views, images, *feature shape) and ``val.npy`` (1 or epochs,
images, ...) in float32; ``batchnorm.pt`` (``update`` only), each epoch's statistics keyed
``"<epoch>/<buffer>"``; ``features.json``, what they were computed from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from transfer.errors import UserError
from transfer.preprocess import Preprocess
from transfer.schema import Schema, read_json

TRAIN, VAL, BATCHNORM, META = "train.npy", "val.npy", "batchnorm.pt", "features.json"
#: The params the features stage reads that can change its outputs, as dvc.yaml declares them.
#: The batch size and epochs matter to ``batchnorm: update`` (and epochs to ``views: auto``).
PARAMS = ("seed", "device", "model", "preprocess", "train.batch_size", "train.amp", "train.deterministic",
          "train.feature_extract.epochs", "train.feature_extract.batchnorm", "train.feature_extract.views")


@contextmanager
def head_inputs(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects what ``head`` receives during the forward passes inside the block."""
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach()))
    try:
        yield captured
    finally:
        handle.remove()


def head_is_last(model: nn.Module, head: nn.Module, sample: torch.Tensor) -> bool:
    """Whether the model's output is the head's output, so training the head on stored head
    inputs is training the model. Checked on ``sample`` in eval mode."""
    outputs: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _module, _args, out: outputs.append(out))
    was_training = model.training
    try:
        with torch.inference_mode():
            result = model.eval()(sample)
    finally:
        handle.remove()
        model.train(was_training)
    return len(outputs) == 1 and outputs[0].shape == result.shape and torch.equal(outputs[0], result)


def batchnorm_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics of every BatchNorm layer (what ``batchnorm: update`` changes)."""
    return {
        f"{name}.{buffer}": getattr(module, buffer).detach().cpu().clone()
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for buffer in ("running_mean", "running_var", "num_batches_tracked")
        if getattr(module, buffer, None) is not None
    }


class BackboneOutputs(Dataset[tuple[Sequence[tuple[int, int]], torch.Tensor]]):
    """Item ``b``: chunk ``b`` of (view, image) pairs and what ``forward`` makes of their
    pixels, so that DataLoader worker processes can run the backbone itself."""

    def __init__(self, images: Dataset, chunks: Sequence[Sequence[tuple[int, int]]],
                 forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images, self.chunks, self.forward = images, chunks, forward

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, b: int) -> tuple[Sequence[tuple[int, int]], torch.Tensor]:
        pixels = torch.stack([self.images[key][0] for key in self.chunks[b]])
        return self.chunks[b], self.forward(pixels)


@dataclass
class FeatureWriter:
    """Fills ``<folder>/train.npy`` and ``val.npy`` batch by batch, memory-mapped, so a large
    data set's features never have to fit in memory at once."""

    arrays: dict[str, np.ndarray] | None = None

    def open(self, folder: Path, feature_shape: tuple[int, ...], train: tuple[int, int], val: tuple[int, int]) -> None:
        """``train``/``val``: (views, images) of each array, followed by ``feature_shape``."""
        self.arrays = {
            name: np.lib.format.open_memmap(folder / name, mode="w+", dtype=np.float32, shape=(*lead, *feature_shape))
            for name, lead in ((TRAIN, train), (VAL, val))
        }

    def write(self, name: str, views: torch.Tensor, indices: torch.Tensor, outputs: torch.Tensor) -> None:
        assert self.arrays is not None
        self.arrays[name][views.numpy(), indices.numpy()] = outputs.float().cpu().numpy()

    def close(self) -> None:
        for array in (self.arrays or {}).values():
            array.flush()
        self.arrays = None


class FeaturesMeta(Schema):
    """``features.json``: what the arrays beside it hold and were computed from."""

    arch: str
    weights: str
    head: str
    classes: list[str]
    feature_shape: list[Annotated[int, Field(gt=0)]]
    views: Annotated[int, Field(ge=0)]
    batchnorm: Literal["frozen", "update"]
    preprocess: Preprocess
    samples: dict[Literal["train", "val"], list[tuple[str, Annotated[int, Field(ge=0)]]]]
    params_digest: str


@dataclass(frozen=True)
class StoredFeatures:
    """What ``train@feature_extract`` reads back: every array checked against the metadata,
    so that a truncated or foreign file is named, never trained on."""

    folder: Path
    meta: FeaturesMeta

    def array(self, name: str, split: str) -> np.ndarray:
        path = self.folder / name
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise UserError(f"{path} is not a readable array ({exc}); {RERUN}") from None
        images = len(self.meta.samples[split])  # type: ignore[index]
        if array.ndim < 2 or array.shape[1] != images or list(array.shape[2:]) != self.meta.feature_shape:
            raise UserError(f"{path} holds an array of shape {array.shape}, not (views, {images}, "
                            f"{', '.join(map(str, self.meta.feature_shape))}) as {self.folder / META} says; {RERUN}")
        return array

    def labels(self, split: str) -> list[int]:
        return [label for _, label in self.meta.samples[split]]  # type: ignore[index]

    def batchnorm(self, epoch: int) -> dict[str, torch.Tensor]:
        state = torch.load(self.folder / BATCHNORM, map_location="cpu", weights_only=True)
        prefix = f"{epoch}/"
        return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}


RERUN = "run the features stage again (`dvc repro --force features`)"


def read_features(folder: Path, params_digest: str) -> StoredFeatures:
    """The features stage's output, checked to have been computed with the params in use
    (``params_digest`` of :data:`PARAMS`), so stale features are never trained on."""
    meta = read_json(folder / META, FeaturesMeta, "the features stage")
    if meta.params_digest != params_digest:
        raise UserError(f"{folder} holds features computed with other params than these: run `dvc repro` "
                        "(the features stage) first")
    return StoredFeatures(folder, meta)
