"""Image-folder data sets, their transforms and loaders, as the tutorial builds them."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from transfer.errors import UserError
from transfer.layout import SPLITS, is_image_name, layout_problem
from transfer.params import PreprocessParams
from transfer.reproducibility import seed_worker

INTERPOLATIONS = {
    "nearest": transforms.InterpolationMode.NEAREST,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "bicubic": transforms.InterpolationMode.BICUBIC,
}


@dataclass(frozen=True)
class Preprocess:
    """Concrete preprocessing: what training used, recorded so evaluation and prediction match."""

    resize: int
    crop: int
    interpolation: str
    mean: list[float]
    std: list[float]


# What the tutorial uses, and what ImageNet-trained weights without metadata expect.
IMAGENET = Preprocess(256, 224, "bilinear", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def resolve_preprocess(params: PreprocessParams, pretrained: dict[str, Any] | None) -> Preprocess:
    """Each ``auto`` param is taken from the weights' metadata, or else from :data:`IMAGENET`."""
    defaults = Preprocess(**pretrained) if pretrained else IMAGENET
    return Preprocess(**{
        name: getattr(defaults, name) if value == "auto" else value
        for name, value in asdict(params).items()
    })


def build_transforms(pre: Preprocess) -> dict[str, transforms.Compose]:
    """The tutorial's ``data_transforms``: random crop and flip to train, centre crop to validate."""
    mode = INTERPOLATIONS[pre.interpolation]
    normalize = transforms.Normalize(pre.mean, pre.std)
    return {
        "train": transforms.Compose([
            transforms.RandomResizedCrop(pre.crop, interpolation=mode),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]),
        "val": eval_transform(pre),
    }


def eval_transform(pre: Preprocess) -> transforms.Compose:
    """Deterministic preprocessing shared by validation, evaluation and prediction."""
    return transforms.Compose([
        transforms.Resize(pre.resize, interpolation=INTERPOLATIONS[pre.interpolation]),
        transforms.CenterCrop(pre.crop),
        transforms.ToTensor(),
        transforms.Normalize(pre.mean, pre.std),
    ])


def load_image_folders(root: Path, tfms: dict[str, transforms.Compose]) -> dict[str, datasets.ImageFolder]:
    """``ImageFolder`` per split; classes are the sorted folder names of train/."""
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
    return {split: datasets.ImageFolder(str(root / split), tfms[split]) for split in tfms}


def resolve_workers(setting: int | str) -> int:
    """``auto``: one loader process per available core, at most 4 (the tutorial's count)."""
    if setting != "auto":
        return int(setting)
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def make_loader(
    dataset: torch.utils.data.Dataset, *, batch_size: int, shuffle: bool, workers: int,
    generator: torch.Generator | None, device: torch.device,
) -> DataLoader:
    """A DataLoader whose shuffling and worker augmentations follow the seeded ``generator``."""
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
        generator=generator, worker_init_fn=seed_worker, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
