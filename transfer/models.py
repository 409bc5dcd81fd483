"""Backbones, their pretrained weights, and the new classification head, found generically (the
last linear or 1x1 convolution layer, or timm's own), so any torchvision or timm classifier
works without a table of names (docs/data-and-models.md).
"""

from __future__ import annotations

import math
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from transfer.errors import ParamError, UserError
from transfer.preprocess import INTERPOLATIONS, Preprocess

STATE_SUFFIXES = (".pth", ".pt", ".safetensors")


@dataclass(frozen=True)
class Head:
    """Where the classifier sits in a model: ``model.get_submodule(name)``."""

    name: str
    in_features: int


TIMM_PREFIX = "timm/"


def _timm() -> types.ModuleType:
    """timm, an optional dependency, imported only for a ``timm/`` model."""
    try:
        import timm
    except ImportError:
        raise UserError("model.arch names a timm model, but timm is not installed: "
                        "pip install 'transfer-pipeline[timm]'") from None
    return timm


def create_backbone(arch: str, source: str = "params.yaml", key: str = "model.arch") -> nn.Module:
    """A randomly initialised classifier with its original head.

    ``arch`` is a torchvision classification model name (``resnet18``, ``vit_b_16``) or a timm
    model name behind ``timm/`` (``timm/convnext_tiny``); an unknown one is blamed on ``key``
    of ``source`` (the params file, or a checkpoint's sidecar).
    """
    if arch.startswith(TIMM_PREFIX):
        timm, name = _timm(), arch[len(TIMM_PREFIX):]
        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('.')[0][:8]}*")[:6]
            hint = f" (close: {', '.join(close)})" if close else ""
            raise ParamError(key, f"{arch!r} is not a timm model{hint}", source)
        base, _, tag = name.partition(".")
        if tag and not timm.list_pretrained(name):  # is_model accepts any tag; create_model would not
            tags = ", ".join(k.split(".", 1)[1] for k in timm.list_pretrained(f"{base}.*")[:8]) or "none"
            raise ParamError(key, f"{arch!r}: {tag!r} is not a pretrained tag of {base} (tags: {tags})", source)
        return timm.create_model(name, pretrained=False)
    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        close = [n for n in names if n.startswith(arch[:4])][:6]
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ParamError(key, f"{arch!r} is not a torchvision classification model{hint}; timm models are "
                         f"written {TIMM_PREFIX}NAME", source)
    model = torchvision.models.get_model(arch, weights=None)
    # GoogLeNet's and Inception v3's auxiliary classifiers make a training forward pass return a
    # tuple: drop them, and scale the input as torchvision does when it builds them pretrained.
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for name, child in list(model.named_children()):
            if type(child).__name__ == "InceptionAux":
                setattr(model, name, None)
    if hasattr(model, "transform_input"):
        model.transform_input = True
    return model


def find_head(model: nn.Module) -> Head:
    """The layer that maps features to class scores: timm's ``get_classifier``, else the last
    ``nn.Linear`` in registration order (``fc``, ``classifier.1``, ``heads.head``), else the last
    1x1 ``nn.Conv2d`` (SqueezeNet)."""
    if hasattr(model, "get_classifier") and hasattr(model, "reset_classifier"):
        classifier = model.get_classifier()
        for name, module in model.named_modules():
            if module is classifier:
                # num_features is the pooled width; some models (MobileNetV3, GhostNet, LCNet)
                # put a wider pre-logits layer between it and the classifier.
                width = getattr(module, "in_features", None) or getattr(module, "in_channels", None)
                return Head(name, int(width or model.num_features))
    linear = conv = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            linear = Head(name, module.in_features)
        elif isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
            conv = Head(name, module.in_channels)
    head = linear or conv
    if head is None:
        raise UserError(f"cannot find a classification head in {model.__class__.__name__}")
    return head


def replace_head(model: nn.Module, num_classes: int) -> Head:
    """Swap the classifier for a new, freshly initialised one with ``num_classes`` outputs."""
    head = find_head(model)
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return find_head(model)
    parent_name, _, attr = head.name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attr)
    if isinstance(old, nn.Conv2d):
        new: nn.Module = nn.Conv2d(head.in_features, num_classes, kernel_size=1)
    else:
        new = nn.Linear(head.in_features, num_classes)
    setattr(parent, attr, new)
    return head


def pretrained_preprocess(arch: str, weights: str, model: nn.Module) -> Preprocess | None:
    """The preprocessing the weights were trained with, from their metadata (torchvision's
    ``weights.transforms()``, timm's pretrained config); local or random torchvision weights
    carry none."""
    if arch.startswith(TIMM_PREFIX):
        config = _timm().data.resolve_data_config({}, model=model)
        crop = int(config["input_size"][-1])
        interpolation = config.get("interpolation", "bilinear")
        return Preprocess(resize=math.floor(crop / config.get("crop_pct", 0.875)), crop=crop,
                          interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear",
                          mean=[float(v) for v in config["mean"]], std=[float(v) for v in config["std"]])
    if weights.lower() == "none" or weights.endswith(STATE_SUFFIXES):
        return None
    preset = torchvision_weights(arch, weights).transforms()
    return Preprocess(resize=int(preset.resize_size[0]), crop=int(preset.crop_size[0]),
                      interpolation=preset.interpolation.value, mean=[float(v) for v in preset.mean],
                      std=[float(v) for v in preset.std])


def freeze_backbone(model: nn.Module, head: Head) -> list[nn.Parameter]:
    """Freeze every parameter outside the head; return the head's (the only trainable) ones."""
    for param in model.parameters():
        param.requires_grad = False
    trainable = list(model.get_submodule(head.name).parameters())
    for param in trainable:
        param.requires_grad = True
    return trainable


def check_input_size(model: nn.Module, crop: int) -> None:
    """Fail now, clearly, if the backbone cannot take ``crop``-pixel images (ViTs want their
    training size, Inception at least 75 pixels), not with a traceback mid-epoch."""
    was_training = model.training
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, 3, crop, crop))
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise UserError(
            f"the model cannot take {crop}x{crop} images ({' '.join(str(exc).split())[:120]}); "
            "set preprocess.crop (and resize) to a size it accepts, or auto"
        ) from None
    finally:
        model.train(was_training)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a plain state_dict from ``.pth``/``.pt`` (weights_only) or ``.safetensors``."""
    if not path.is_file():
        raise UserError(f"weights file {path} {'is not a regular file' if path.exists() else 'does not exist'}")
    if path.suffix not in STATE_SUFFIXES:
        raise UserError(f"weights file {path} must end in {', '.join(STATE_SUFFIXES)}")
    with path.open("rb") as file:
        head = file.read(8)
    if path.suffix != ".safetensors" and not head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip, or pickle
        raise UserError(f"weights file {path} is not a PyTorch weights file (it starts with {head!r}): save a "
                        "state_dict with torch.save, or use .safetensors")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors errors all mean "not loadable"
        unsafe = re.search(r"GLOBAL (\S+)", str(exc))
        if unsafe:
            raise UserError(f"weights file {path} holds pickled Python objects beyond tensors ({unsafe.group(1)}), "
                            "which loading could run as code: refused. Save a plain state_dict "
                            "(torch.save(model.state_dict(), path)), or use .safetensors") from None
        raise UserError(f"cannot read weights file {path} ({exc.__class__.__name__}: "
                        f"{' '.join(str(exc).split())[:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} is not a plain state_dict (a mapping of names to tensors)")
    return state


def load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``, but for the head (replaced anyway); other keys must match
    exactly, and a mismatch lists them, as a file made for another architecture needs."""
    head = find_head(model).name + "."
    body = {k: v for k, v in state.items() if not k.startswith(head) and not _dropped(model, k)}
    expected = {k for k in model.state_dict() if not k.startswith(head)}
    missing, unexpected = sorted(expected - set(body)), sorted(set(body) - expected)
    if missing or unexpected:
        raise UserError(
            f"{source} does not match {model.__class__.__name__}: "
            f"{len(missing)} missing keys {_few(missing)}, {len(unexpected)} unexpected keys {_few(unexpected)}"
        )
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(shapes[k])}" for k, v in body.items() if v.shape != shapes[k]]
    if wrong:
        raise UserError(f"{source} has tensors of the wrong shape for {model.__class__.__name__}: {_few(wrong)}")
    model.load_state_dict(body, strict=False)


def _dropped(model: nn.Module, key: str) -> bool:
    """Whether ``key`` belongs to a submodule the model set to None (the dropped auxiliary heads)."""
    owner: Any = model
    for part in key.split(".")[:-1]:
        owner = getattr(owner, part, False)
        if owner is None:
            return True
        if not isinstance(owner, nn.Module):
            return False
    return False


def torchvision_weights(arch: str, name: str, source: str = "params.yaml") -> torchvision.models.WeightsEnum:
    """The torchvision weights enum entry ``name`` (or DEFAULT) for ``arch``."""
    try:
        enum = torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        raise ParamError("model.arch", f"{arch!r} has no torchvision weights", source) from None
    if name == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[name]
    except KeyError:
        known = ", ".join(["DEFAULT", *(m for m in enum.__members__ if m != "DEFAULT")])
        raise ParamError(
            "model.weights", f"{name!r} is neither a weights name of {arch} ({known}), "
            "none, nor a path ending in .pth, .pt or .safetensors", source
        ) from None


def timm_pretrained(arch: str, tag: str, source: str = "params.yaml") -> nn.Module:
    """The timm model ``arch`` with its pretrained weights ``tag`` (``DEFAULT``: timm's default),
    from the Hugging Face Hub or timm's cache (offline with ``HF_HUB_OFFLINE=1``)."""
    timm, name = _timm(), arch[len(TIMM_PREFIX):]
    base = name.split(".")[0]
    full = name if tag == "DEFAULT" else f"{base}.{tag}"
    known = timm.list_pretrained(f"{base}.*")
    if tag != "DEFAULT" and full not in known:
        tags = ", ".join(k.split(".", 1)[1] for k in known[:8]) or "none"
        raise ParamError("model.weights", f"{tag!r} is not a pretrained tag of {base} "
                        f"(tags: {tags}), nor none or a .pth/.pt/.safetensors path", source)
    try:
        return timm.create_model(full, pretrained=True)
    except Exception as exc:  # hub, network and file errors all end the same way for the user
        raise UserError(
            f"could not get timm weights {full} ({exc.__class__.__name__}: {' '.join(str(exc).split())[:150]}); "
            "run once with network access, or set model.weights to a local .pth/.safetensors file"
        ) from None


def weights_hash_prefix(url: str) -> str | None:
    """The sha256 prefix torchvision puts in its file names (``resnet18-f37072fd.pth``)."""
    match = re.search(r"-([a-f0-9]{6,})\.", Path(url).name)
    return match.group(1) if match else None


def _few(items: list[str]) -> str:
    shown = ", ".join(items[:4])
    return f"({shown}{', ...' if len(items) > 4 else ''})" if items else ""
