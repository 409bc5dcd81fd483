"""Checkpoints: a plain state_dict (``.pt``) with its metadata in a JSON sidecar beside it.

A plain state_dict loads with ``torch.load(..., weights_only=True)``, which executes no
pickled code. The sidecar says what rebuilds the model and preprocesses images exactly as
training did; it is validated like params.yaml, so a damaged one is named, not trusted.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, ClassVar, TypeVar

import torch
from pydantic import Field, model_validator
from torch import nn

from transfer.atomic import write_bytes, write_json
from transfer.errors import UserError, one_line
from transfer.models import Head, check_input_size, create_backbone, load_backbone_state, replace_head
from transfer.params import ModelParams, Probability
from transfer.preprocess import Preprocess
from transfer.schema import Problem, Schema, read_json

M = TypeVar("M", "PretrainedMeta", "CheckpointMeta")


class PretrainedMeta(Schema):
    """``models/pretrained.json``: the backbone's starting weights, and what they expect."""

    WRITER: ClassVar[str] = "the weights stage"
    arch: str
    weights: str
    pretrained: bool  #: False: torch's random initialisation from the seed (``weights: none``)
    source: str
    sha256: str | None
    preprocess: Preprocess | None  #: from the weights' metadata, where they have any


class CheckpointMeta(Schema):
    """``models/<strategy>.json``: a trained classifier's best epoch and how it was made."""

    WRITER: ClassVar[str] = "its train stage"
    strategy: str  #: the strategy that trained it
    arch: str
    classes: list[str]
    head: str
    epoch: Annotated[int, Field(ge=1)]
    val_acc: Probability
    weights: str
    weights_source: str
    weights_sha256: str | None
    preprocess: Preprocess
    params_digest: str

    @model_validator(mode="after")
    def _classes(self) -> CheckpointMeta:
        if not 2 <= len(set(self.classes)) == len(self.classes):
            raise Problem("classes", f"must be 2 or more different names, got {self.classes}")
        return self


def sidecar_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".json")


def save_tensors(path: Path, state: dict[str, torch.Tensor], *, now: bool = False) -> None:
    """``torch.save`` through memory, then an atomic write: saving to the temporary file
    directly would record its random name inside the archive, and the same tensors would
    give different bytes (and a different DVC hash) on every run."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_bytes(path, buffer.getvalue(), now=now)


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], meta: PretrainedMeta | CheckpointMeta) -> None:
    """Write the state_dict and then its sidecar, each atomically and byte-reproducibly."""
    save_tensors(path, state)
    write_json(sidecar_path(path), meta.model_dump())


def read_meta(path: Path, schema: type[M]) -> M:
    """The sidecar of ``path``, validated against ``schema``; errors name the sidecar."""
    if not path.is_file():
        raise UserError(f"{path} does not exist: run {schema.WRITER} first (`dvc repro`)")
    return read_json(sidecar_path(path), schema, schema.WRITER)


def read_start(path: Path, schema: type[M], model: ModelParams) -> M:
    """The sidecar of what a stage starts from, checked to describe the weights the params ask for."""
    meta = read_meta(path, schema)
    if meta.arch != model.arch or meta.weights != model.weights:
        raise UserError(f"{path} holds {meta.arch} weights {meta.weights!r}, not the params' {model.arch} "
                        f"{model.weights!r}: run `dvc repro` first")
    return meta


def pretrained_classifier(path: Path, meta: PretrainedMeta, num_classes: int, crop: int) -> tuple[nn.Module, Head]:
    """The backbone with the weights stage's weights (or, for ``none``, torch's seeded random
    initialisation) and a new head for ``num_classes``; it must take ``crop``-pixel images.

    Every stage that builds the classifier calls this after seeding, so the new head starts
    from the same random weights in each of them.
    """
    model = create_backbone(meta.arch, str(sidecar_path(path)), "arch")
    if meta.pretrained:
        load_backbone_state(model, torch.load(path, map_location="cpu", weights_only=True), str(path))
    head = replace_head(model, num_classes)
    check_input_size(model, crop)
    return model, head


def trained_classifier(path: Path, meta: CheckpointMeta, device: torch.device) -> nn.Module:
    """The classifier ``path`` holds, on ``device``, in eval mode."""
    model = create_backbone(meta.arch, str(sidecar_path(path)), "arch")
    replace_head(model, len(meta.classes))
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # any failure here means the file is not the checkpoint its sidecar describes
        raise UserError(f"cannot load checkpoint {path}: {one_line(exc, 200)}") from None
    if any(v.is_floating_point() and not v.isfinite().all() for v in state.values()):
        raise UserError(f"checkpoint {path} holds weights that are not finite numbers (NaN or infinity), whose "
                        "predictions mean nothing: train it again (`dvc repro --force`)")
    return model.to(device).eval()
