"""The preprocessing recipe and the exact steps that turn an image into the model's input:
geometry on PIL images as in the tutorial, giving uint8 pixels, then :class:`ModelInput`
normalises a batch where the model runs (a quarter of the bytes cross to a GPU), bit for bit
the tutorial's ``ToTensor()`` + ``Normalize()`` (the tests hold it to them).
"""

from __future__ import annotations

import typing

import torch
from PIL import Image
from pydantic import model_validator
from torchvision import transforms
from torchvision.transforms import functional as F

from transfer.params import Interpolation, Mean, PreprocessParams, Side, Std
from transfer.schema import Problem, Schema, validate

INTERPOLATIONS = {name: transforms.InterpolationMode(name) for name in typing.get_args(Interpolation)}
#: Normalised pixels beyond this overflow a network's sums (std 1e-30 gives 1e30 and NaN
#: features); real data sets' means are 0-1 and their stds 0.1-0.5, which gives about 3.
MAX_INPUT = 1000.0


class Preprocess(Schema):
    """Concrete preprocessing: what training used, recorded so evaluation and prediction match."""

    resize: Side
    crop: Side
    interpolation: Interpolation
    mean: Mean
    std: Std

    @model_validator(mode="after")
    def _sound(self) -> Preprocess:
        if self.crop > self.resize:
            raise Problem("crop", f"is {self.crop}, larger than resize ({self.resize}): validation would pad its "
                          "crops with black where training crops have none; make crop at most resize")
        extreme = max(abs(v - m) / s for m, s in zip(self.mean, self.std, strict=True) for v in (0.0, 1.0))
        if extreme > MAX_INPUT:
            raise Problem("std", f"and mean {self.mean} make normalised pixels reach {extreme:.3g}, beyond "
                          f"{MAX_INPUT:g}, where the network's sums overflow: set them to the data's own (or auto)")
        return self


# What the tutorial uses, and what ImageNet-trained weights without metadata expect.
IMAGENET = Preprocess(resize=256, crop=224, interpolation="bilinear", mean=[0.485, 0.456, 0.406],
                      std=[0.229, 0.224, 0.225])


def resolve_preprocess(params: PreprocessParams, pretrained: Preprocess | None,
                       source: str = "params.yaml") -> Preprocess:
    """Each ``auto`` of the ``preprocess`` params is taken from the weights' metadata, or else
    from :data:`IMAGENET`; the result is checked once all values are known."""
    values = {key: getattr(pretrained or IMAGENET, key) if value == "auto" else value
              for key, value in params.model_dump().items()}
    return validate(Preprocess, values, source, prefix="preprocess.")


def val_crop(image: Image.Image, pre: Preprocess) -> Image.Image:
    """The tutorial's validation geometry: ``Resize(resize)`` then ``CenterCrop(crop)``."""
    return F.center_crop(F.resize(image, pre.resize, interpolation=INTERPOLATIONS[pre.interpolation]), pre.crop)


class ModelInput:
    """uint8 NCHW batches from a loader -> the model's float input on ``device``: copied
    (non-blocking from pinned memory), then ``ToTensor`` and ``Normalize``, the same operations
    in the same order, so the values are bit-identical to the tutorial's; channels-last
    (faster convolutions on CPUs and tensor cores).

    The mean and std live on the device from the start: building them from Python lists per
    batch would be a blocking host-to-device copy that undoes the non-blocking batch copy."""

    def __init__(self, pre: Preprocess, device: torch.device) -> None:
        self.device = device
        self.mean, self.std = (torch.tensor(values, device=device).view(-1, 1, 1) for values in (pre.mean, pre.std))

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = batch.to(self.device, non_blocking=True)
        return pixels.float().div_(255).sub_(self.mean).div_(self.std).contiguous(memory_format=torch.channels_last)
