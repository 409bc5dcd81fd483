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

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import NonNegativeInt, PositiveInt
from torch import nn

from transfer.errors import UserError, one_line
from transfer.preprocess import Preprocess
from transfer.schema import Schema, read_json

TRAIN, VAL, BATCHNORM, META = "train.npy", "val.npy", "batchnorm.pt", "features.json"
#: The params that decide how the backbone runs on which batches, read alike by the features
#: stage and every train stage.
BACKBONE_PARAMS = ("seed", "device", "model", "preprocess", "train.batch_size", "train.amp", "train.deterministic")
#: The params the features stage reads that can change its outputs, as dvc.yaml declares them.
#: The batch size and epochs matter to ``batchnorm: update`` (and epochs to ``views: auto``).
PARAMS = (*BACKBONE_PARAMS, "train.feature_extract.epochs", "train.feature_extract.batchnorm",
          "train.feature_extract.views")


@contextmanager
def head_inputs(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collects what ``head`` receives during the forward passes inside the block."""
    captured: list[torch.Tensor] = []
    with head.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach())):
        yield captured


class FeaturesMeta(Schema):
    """``features.json``: what the arrays beside it hold and were computed from."""

    arch: str
    weights: str
    head: str
    classes: list[str]
    feature_shape: list[PositiveInt]
    views: NonNegativeInt
    batchnorm: Literal["frozen", "update"]
    preprocess: Preprocess
    samples: dict[Literal["train", "val"], list[tuple[str, NonNegativeInt]]]
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
        expected = (len(self.meta.samples[split]), *self.meta.feature_shape)  # type: ignore[index]
        # A float64 array would reach the head as float64 and fail inside torch; no views at all
        # would leave training nothing to cycle through.
        if array.dtype != np.float32 or array.shape[1:] != expected or not len(array):
            raise UserError(f"{path} holds a {array.dtype} array of shape {array.shape}, not float32 of shape "
                            f"(views, {', '.join(map(str, expected))}) as {self.folder / META} says; {RERUN}")
        return array

    def labels(self, split: str) -> list[int]:
        return [label for _, label in self.meta.samples[split]]  # type: ignore[index]

    def batchnorm(self, epoch: int) -> dict[str, torch.Tensor]:
        path = self.folder / BATCHNORM
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: any failure means "not usable"
            raise UserError(f"{path} is not readable ({one_line(exc, 200)}); {RERUN}") from None
        prefix = f"{epoch}/"
        return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


RERUN = "run the features stage again (`dvc repro --force features`)"


def read_features(folder: Path, params_digest: str) -> StoredFeatures:
    """The features stage's output, checked to have been computed with the params in use
    (``params_digest`` of :data:`PARAMS`), so stale features are never trained on."""
    meta = read_json(folder / META, FeaturesMeta, "the features stage")
    if meta.params_digest != params_digest:
        raise UserError(f"{folder} holds features computed with other params than these: run `dvc repro` "
                        "(the features stage) first")
    return StoredFeatures(folder, meta)
