"""The preprocessing recipe and the exact steps that turn an image into the model's input:
geometry on PIL images as in the tutorial, giving uint8 pixels, then :class:`ModelInput`
normalises a batch where the model runs (a quarter of the bytes cross to a GPU), bit for bit
the tutorial's ``ToTensor()`` + ``Normalize()`` (:func:`eval_transform`, which predict uses).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

from transfer.errors import ParamError
from transfer.params import PreprocessParams, crop_problem

INTERPOLATIONS = {
    "nearest": transforms.InterpolationMode.NEAREST,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
}


@dataclass(frozen=True)
class Preprocess:
    """Concrete preprocessing: what training used, recorded so evaluation and prediction match."""

    resize: int = field(metadata={"gt": 0})
    crop: int = field(metadata={"gt": 0})
    interpolation: Literal["nearest", "bilinear", "bicubic"]
    mean: list[float] = field(metadata={"length": 3})
    std: list[float] = field(metadata={"length": 3, "gt": 0})

    def check(self) -> tuple[str, str] | None:
        return ("crop", crop_problem(self.crop, self.resize)) if self.crop > self.resize else None


# What the tutorial uses, and what ImageNet-trained weights without metadata expect.
IMAGENET = Preprocess(256, 224, "bilinear", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def resolve_preprocess(params: PreprocessParams, pretrained: Preprocess | None) -> Preprocess:
    """Each ``auto`` param is taken from the weights' metadata, or else from :data:`IMAGENET`;
    a crop larger than the resize is refused once both are known."""
    defaults = pretrained or IMAGENET
    pre = Preprocess(**{
        name: getattr(defaults, name) if value == "auto" else value
        for name, value in asdict(params).items()
    })
    if pre.crop > pre.resize:
        raise ParamError("preprocess.crop", crop_problem(pre.crop, pre.resize))
    return pre


def val_crop(image: Image.Image, pre: Preprocess) -> Image.Image:
    """The tutorial's validation geometry: ``Resize(resize)`` then ``CenterCrop(crop)``."""
    resized = F.resize(image, pre.resize, interpolation=INTERPOLATIONS[pre.interpolation])
    return F.center_crop(resized, pre.crop)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a CHW uint8 tensor (the pixels ``ToTensor`` would scale to [0, 1])."""
    return F.pil_to_tensor(image)


class ModelInput:
    """uint8 NCHW batches from a loader -> the model's float input on ``device``: copied
    (non-blocking from pinned memory), then ``ToTensor`` and ``Normalize``, the same operations
    in the same order, so the values are bit-identical to the tutorial's; channels-last
    (faster convolutions on CPUs and tensor cores).

    The mean and std live on the device from the start: building them from Python lists per
    batch would be a blocking host-to-device copy that undoes the non-blocking batch copy."""

    def __init__(self, pre: Preprocess, device: torch.device) -> None:
        self.device = device
        self.mean = torch.tensor(pre.mean, device=device).view(-1, 1, 1)
        self.std = torch.tensor(pre.std, device=device).view(-1, 1, 1)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = batch.to(self.device, non_blocking=True)
        return pixels.float().div_(255).sub_(self.mean).div_(self.std).contiguous(memory_format=torch.channels_last)


def eval_transform(pre: Preprocess) -> transforms.Compose:
    """The tutorial's validation transform on one PIL image (``predict`` uses it; the stages'
    uint8 path is tested against it)."""
    return transforms.Compose([
        transforms.Resize(pre.resize, interpolation=INTERPOLATIONS[pre.interpolation]),
        transforms.CenterCrop(pre.crop),
        transforms.ToTensor(),
        transforms.Normalize(pre.mean, pre.std),
    ])
