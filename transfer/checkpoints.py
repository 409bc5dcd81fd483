"""Checkpoints: a plain state_dict (``.pt``) with its metadata in a JSON file beside it.

A plain state_dict loads with ``torch.load(..., weights_only=True)``, which executes no
pickled code, on any device via ``map_location``. The JSON sidecar says what is needed to
rebuild the model and preprocess images exactly as training did.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfer.atomic import atomic_path, write_json
from transfer.data import Preprocess
from transfer.errors import UserError
from transfer.models import create_backbone, replace_head
from transfer.params import ModelParams


def sidecar_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".json")


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the state_dict and then its sidecar, each atomically."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    write_json(sidecar_path(path), meta)


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = sidecar_path(path)
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{meta_path} does not exist: run the stage that writes {path} first") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{meta_path} is not valid JSON ({exc})") from None


def read_pretrained_meta(path: Path, model: ModelParams) -> dict[str, Any]:
    """The weights stage's sidecar, checked to describe the weights params.yaml asks for."""
    meta = read_meta(path)
    if meta["arch"] != model.arch or meta["weights"] != model.weights:
        raise UserError(f"{path} holds {meta['arch']} weights {meta['weights']!r}, not those in "
                        "params.yaml: run `dvc repro` (the weights stage) first")
    return meta


def load_trained_model(path: Path, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained classifier from ``path`` and its sidecar, on ``device``, in eval mode."""
    meta = read_meta(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist: run `dvc repro` to train it")
    model = create_backbone(meta["arch"])
    replace_head(model, len(meta["classes"]))
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # any failure here means the file is not the checkpoint described
        raise UserError(f"cannot load checkpoint {path}: {' '.join(str(exc).split())[:200]}") from None
    return model.to(device).eval(), meta


def preprocess_of(meta: dict[str, Any]) -> Preprocess:
    """The preprocessing a checkpoint was trained with, as recorded in its sidecar."""
    return Preprocess(**meta["preprocess"])
