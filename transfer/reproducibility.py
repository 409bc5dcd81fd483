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
