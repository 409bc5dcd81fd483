"""Backbones, their pretrained weights, and the new classification head, found generically (the
last linear or 1x1 convolution layer, or timm's own), so any torchvision or timm classifier
works without a table of names (docs/data-and-models.md).
"""

from __future__ import annotations

import re
import stat
import types
from pathlib import Path
from typing import NamedTuple

import torch
import torchvision
from torch import nn

from transfer.errors import ParamError, UserError, one_line
from transfer.preprocess import INTERPOLATIONS, Preprocess

STATE_SUFFIXES = (".pth", ".pt", ".safetensors")


class Head(NamedTuple):
    """Where the classifier sits in a model: ``model.get_submodule(name)``."""

    name: str
    in_features: int


def _timm() -> types.ModuleType:
    """timm, an optional dependency, imported only for a ``timm/`` model."""
    try:
        import timm
    except ImportError:
        raise UserError("model.arch names a timm model, but timm is not installed: "
                        "pip install 'transfer-pipeline[timm]'") from None
    return timm


def _close(names: list[str]) -> str:
    """The first few of ``names``, for a hint in an error message."""
    return f" (close: {', '.join(names[:6])})" if names else ""


def _not_a_tag(base: str, tag: str) -> str:
    tags = ", ".join(k.partition(".")[2] for k in _timm().list_pretrained(f"{base}.*")[:8]) or "none"
    return f"{tag!r} is not a pretrained tag of {base} (tags: {tags})"


def create_backbone(arch: str, source: str = "params.yaml", key: str = "model.arch") -> nn.Module:
    """A randomly initialised classifier with its original head.

    ``arch`` is a torchvision classification model name (``resnet18``, ``vit_b_16``) or a timm
    model name behind ``timm/`` (``timm/convnext_tiny``); an unknown one is blamed on ``key``
    of ``source`` (the params file, or a checkpoint's sidecar).
    """
    if arch.startswith("timm/"):
        timm, name = _timm(), arch.removeprefix("timm/")
        base, _, tag = name.partition(".")
        if not timm.is_model(name):
            raise ParamError(key, f"{arch!r} is not a timm model{_close(timm.list_models(f'*{base[:8]}*'))}", source)
        if tag and not timm.list_pretrained(name):  # is_model accepts any tag; create_model would not
            raise ParamError(key, f"{arch!r}: {_not_a_tag(base, tag)}", source)
        return timm.create_model(name)  # pretrained=False by default
    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise ParamError(key, f"{arch!r} is not a torchvision classification model"
                         f"{_close([n for n in names if n.startswith(arch[:4])])}; timm models are written timm/NAME",
                         source)
    model = torchvision.models.get_model(arch)  # weights=None by default
    # GoogLeNet's and Inception v3's auxiliary classifiers make a training forward pass return a
    # tuple: drop them, and scale the input as torchvision does when it builds them pretrained.
    for name, child in model.named_children():  # setting one to None keeps the dict's size
        if type(child).__name__ == "InceptionAux":
            model.aux_logits, model.transform_input = False, True
            setattr(model, name, None)
    return model


def find_head(model: nn.Module) -> Head:
    """The layer that maps features to class scores: timm's ``get_classifier``, else the last
    ``nn.Linear`` in registration order (``fc``, ``classifier.1``, ``heads.head``), else the last
    1x1 ``nn.Conv2d`` (SqueezeNet)."""
    classifier = getattr(model, "get_classifier", lambda: None)()
    linear = conv = None
    for name, module in model.named_modules():
        width = getattr(module, "in_features", None) or getattr(module, "in_channels", None)
        if module is classifier:
            # num_features is the pooled width; some models (MobileNetV3, GhostNet, LCNet)
            # put a wider pre-logits layer between it and the classifier.
            return Head(name, width or model.num_features)
        if isinstance(module, nn.Linear):
            linear = Head(name, width)
        elif isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
            conv = Head(name, width)
    if head := linear or conv:
        return head
    raise UserError(f"cannot find a classification head in {model.__class__.__name__}")


def replace_head(model: nn.Module, num_classes: int) -> Head:
    """Swap the classifier for a new, freshly initialised one with ``num_classes`` outputs."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
    else:
        name, width = find_head(model)
        model.set_submodule(name, nn.Conv2d(width, num_classes, 1) if isinstance(model.get_submodule(name), nn.Conv2d)
                            else nn.Linear(width, num_classes))
    return find_head(model)


def pretrained_preprocess(arch: str, weights: str, model: nn.Module) -> Preprocess | None:
    """The preprocessing the weights were trained with, from their metadata (torchvision's
    ``weights.transforms()``, timm's pretrained config); local or random torchvision weights
    carry none."""
    if arch.startswith("timm/"):
        config = _timm().data.resolve_data_config(model=model)
        crop = config["input_size"][-1]
        recipe = crop / config["crop_pct"], crop, config["interpolation"], config["mean"], config["std"]
    elif weights.lower() == "none" or weights.endswith(STATE_SUFFIXES):
        return None
    else:
        preset = torchvision_weights(arch, weights).transforms()
        recipe = preset.resize_size[0], preset.crop_size[0], preset.interpolation.value, preset.mean, preset.std
    resize, crop, interpolation, mean, std = recipe
    return Preprocess(resize=int(resize), crop=crop,  # int: timm's crop / crop_pct, floored
                      interpolation=interpolation if interpolation in INTERPOLATIONS else "bilinear",
                      mean=list(mean), std=list(std))  # ints become floats in validation


def freeze_backbone(model: nn.Module, head: Head) -> list[nn.Parameter]:
    """Freeze every parameter outside the head; return the head's (the only trainable) ones."""
    model.requires_grad_(False)
    return list(model.get_submodule(head.name).requires_grad_().parameters())


def check_input_size(model: nn.Module, crop: int) -> None:
    """Fail now, clearly, if the backbone cannot take ``crop``-pixel images (ViTs want their
    training size, Inception at least 75 pixels), not with a traceback mid-epoch."""
    was_training = model.training
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, 3, crop, crop))
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise UserError(
            f"the model cannot take {crop}x{crop} images ({one_line(exc, 120)}); "
            "set preprocess.crop (and resize) to a size it accepts, or auto"
        ) from None
    finally:
        model.train(was_training)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a plain state_dict from ``.pth``/``.pt`` (weights_only) or ``.safetensors``.

    A path that cannot be looked up (a link loop, a name too long) raises its own OSError."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"weights file {path} does not exist") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"weights file {path} is not a regular file")
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

            state = load_file(path)  # to the CPU by default
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors errors all mean "not loadable"
        if unsafe := re.search(r"GLOBAL (\S+)", str(exc)):
            raise UserError(f"weights file {path} holds pickled Python objects beyond tensors ({unsafe[1]}), "
                            "which loading could run as code: refused. Save a plain state_dict "
                            "(torch.save(model.state_dict(), path)), or use .safetensors") from None
        raise UserError(f"cannot read weights file {path} ({exc.__class__.__name__}: "
                        f"{one_line(exc, 200)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} is not a plain state_dict (a mapping of names to tensors)")
    return state


def load_backbone_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model``, but for the head (replaced anyway) and the submodules the
    model set to None (the auxiliary classifiers :func:`create_backbone` drops); other keys must
    match exactly, and a mismatch lists them, as a file made for another architecture needs."""
    skip = (f"{find_head(model).name}.", *(f"{name}." for name, child in model._modules.items() if child is None))
    body, own = ({k: v for k, v in d.items() if not k.startswith(skip)} for d in (state, model.state_dict()))
    missing, unexpected = sorted(own.keys() - body), sorted(body.keys() - own)
    if missing or unexpected:
        raise UserError(
            f"{source} does not match {model.__class__.__name__}: "
            f"{len(missing)} missing keys {_few(missing)}, {len(unexpected)} unexpected keys {_few(unexpected)}"
        )
    if wrong := [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in body.items() if v.shape != own[k].shape]:
        raise UserError(f"{source} has tensors of the wrong shape for {model.__class__.__name__}: {_few(wrong)}")
    model.load_state_dict(body, strict=False)


def torchvision_weights(arch: str, name: str, source: str = "params.yaml") -> torchvision.models.WeightsEnum:
    """The torchvision weights enum entry ``name`` (or DEFAULT, an alias in the enum) for ``arch``."""
    enum = torchvision.models.get_model_weights(arch)  # every classification model has weights
    try:
        return enum[name]
    except KeyError:
        raise ParamError(
            "model.weights", f"{name!r} is neither a weights name of {arch} "
            f"({', '.join(dict.fromkeys(['DEFAULT', *enum.__members__]))}), none, nor a path ending in .pth, .pt or "
            ".safetensors", source
        ) from None


def timm_pretrained(arch: str, tag: str, source: str) -> nn.Module:
    """The timm model ``arch`` with its pretrained weights ``tag`` (``DEFAULT``: timm's default),
    from the Hugging Face Hub or timm's cache (offline with ``HF_HUB_OFFLINE=1``)."""
    timm, name = _timm(), arch.removeprefix("timm/")
    base = name.partition(".")[0]
    full = name if tag == "DEFAULT" else f"{base}.{tag}"
    if tag != "DEFAULT" and full not in timm.list_pretrained(f"{base}.*"):
        raise ParamError("model.weights", f"{_not_a_tag(base, tag)}, nor none or a .pth/.pt/.safetensors path",
                         source)
    try:
        return timm.create_model(full, pretrained=True)
    except Exception as exc:  # hub, network and file errors all end the same way for the user
        raise UserError(
            f"could not get timm weights {full} ({exc.__class__.__name__}: {one_line(exc, 150)}); "
            "run once with network access, or set model.weights to a local .pth/.safetensors file"
        ) from None


def weights_hash_prefix(url: str) -> str | None:
    """The sha256 prefix torchvision puts in its file names (``resnet18-f37072fd.pth``)."""
    match = re.search(r"-([a-f0-9]{6,})\.[^/]*$", url)  # in the file name
    return match[1] if match else None


def _few(items: list[str]) -> str:
    return f"({', '.join(items[:4])}{', ...' if len(items) > 4 else ''})" if items else ""
