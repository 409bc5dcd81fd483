"""Seeding and determinism switches, in one place so every stage applies the same ones.

The global generators seeded here decide random initialisation (of the new head, and of
the whole backbone with ``model.weights: none``). Shuffling and augmentation do not draw
from them: they follow ``(seed, epoch, image)`` (see :mod:`transfer.data` and
:mod:`transfer.augment`), so they do not depend on how many loader processes run.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
from torch import nn

from transfer.errors import ParamError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """Deterministic kernels when asked; otherwise let cuDNN pick the fastest ones."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic


#: Layers whose backward on CUDA has no deterministic kernel in torch, so that under
#: ``torch.use_deterministic_algorithms(True)`` they raise at the first step (torch's list;
#: adaptive average pooling only to an output larger than 1x1, which torch computes as a mean).
NONDETERMINISTIC_ON_CUDA = (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.AvgPool3d,
                            nn.FractionalMaxPool2d, nn.FractionalMaxPool3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
                            nn.ReflectionPad3d, nn.Upsample)


def nondeterministic_layers(model: nn.Module) -> list[str]:
    """The layers of ``model`` that :data:`NONDETERMINISTIC_ON_CUDA` names, as ``name (Type)``."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, NONDETERMINISTIC_ON_CUDA):
            continue
        if isinstance(module, nn.AdaptiveAvgPool2d | nn.AdaptiveAvgPool3d) and _all_ones(module.output_size):
            continue
        if isinstance(module, nn.Upsample) and module.mode == "nearest":
            continue
        found.append(f"{name} ({module.__class__.__name__})")
    return found


def _all_ones(size: object) -> bool:
    return all(s in (1, None) for s in (size if isinstance(size, tuple | list) else (size,)))


def check_deterministic(model: nn.Module, device: torch.device, deterministic: bool) -> None:
    """Refuse, before training, ``train.deterministic`` on CUDA for a model whose backward
    would raise there (VGG's and AlexNet's pooling to 7x7, say), instead of a traceback at the
    first step."""
    layers = nondeterministic_layers(model) if deterministic and device.type == "cuda" else []
    if layers:
        raise ParamError("train.deterministic", f"is true, but torch has no deterministic CUDA backward for "
                         f"{', '.join(layers[:3])}{' ...' if len(layers) > 3 else ''}: set it to false (the "
                         "results then vary in their last bits between runs), or train the head alone "
                         "(feature_extract)")
