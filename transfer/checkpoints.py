"""Checkpoints: a plain state_dict (``.pt``) with its metadata in a JSON file beside it.

A plain state_dict loads with ``torch.load(..., weights_only=True)``, which executes no
pickled code, on any device via ``map_location``. The JSON sidecar says what is needed to
rebuild the model and preprocess images exactly as training did.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfer.atomic import write_bytes, write_json
from transfer.errors import ParamError, UserError
from transfer.models import Head, check_input_size, create_backbone, load_backbone_state, replace_head
from transfer.params import ModelParams
from transfer.preprocess import Preprocess


def sidecar_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".json")


def save_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    """``torch.save`` through memory, then an atomic write: saving to the temporary file
    directly would record its random name inside the archive, and the same tensors would
    give different bytes (and a different DVC hash) on every run."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue())


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the state_dict and then its sidecar, each atomically and byte-reproducibly."""
    save_tensors(path, state)
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
    """The weights stage's sidecar, checked to describe the weights the params ask for."""
    meta = read_meta(path)
    if meta["arch"] != model.arch or meta["weights"] != model.weights:
        raise UserError(f"{path} holds {meta['arch']} weights {meta['weights']!r}, not those in "
                        f"{ParamError.source}: run `dvc repro` (the weights stage) first")
    return meta


def pretrained_classifier(path: Path, meta: dict[str, Any], num_classes: int, crop: int) -> tuple[nn.Module, Head]:
    """The backbone with the weights stage's weights (or, for ``none``, torch's seeded random
    initialisation) and a new head for ``num_classes``; it must take ``crop``-pixel images.

    Every stage that builds the classifier calls this after seeding, so the new head starts
    from the same random weights in each of them.
    """
    model = create_backbone(meta["arch"])
    if meta["pretrained"]:
        state = torch.load(path, map_location="cpu", weights_only=True)
        load_backbone_state(model, state, str(path))
    head = replace_head(model, num_classes)
    check_input_size(model, crop)
    return model, head


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
