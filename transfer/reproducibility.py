"""Seeding and determinism switches, in one place so every stage applies the same ones.

The global generators seeded here decide random initialisation (of the new head, and of
the whole backbone with ``model.weights: none``). Shuffling and augmentation do not draw
from them: they follow ``(seed, epoch, image)`` (see :mod:`transfer.datasets` and
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


def check_deterministic(model: nn.Module, device: torch.device, deterministic: bool, crop: int,
                        source: str) -> None:
    """Refuse, before training, ``train.deterministic`` for a model with an operation that has
    no deterministic kernel on ``device`` (VGG's and AlexNet's pooling to 7x7 on CUDA, say),
    instead of a traceback at the first step. Torch itself is asked: one forward and backward
    pass of two blank images in eval mode (BatchNorm's statistics untouched) under its
    deterministic mode, so the check knows every operation torch knows."""
    if not deterministic:
        return
    was_training = model.training
    try:
        model.eval()(torch.zeros(2, 3, crop, crop, device=device)).float().sum().backward()
    except RuntimeError as exc:
        if "deterministic" not in str(exc):
            raise
        raise ParamError("train.deterministic", f"is true, but torch has no deterministic {device.type} kernel for "
                         f"this model ({str(exc).split(',')[0]}): set it to false (the results then vary in their "
                         "last bits between runs), or train the head alone (feature_extract)", source) from None
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
