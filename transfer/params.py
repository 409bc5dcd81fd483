"""params.yaml, read once and validated against a typed schema.

The schema is a tree of frozen dataclasses. Every key in params.yaml must appear in it and
every field must be present in params.yaml: params.yaml is the single source of every knob,
so the code holds no second set of defaults. A wrong type, a value out of range, a missing
or an unknown key fails at start-up with one line that names the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from transfer.errors import ParamError, UserError

MODES = ("finetune", "feature_extract")
Mode = Literal["finetune", "feature_extract"]
Auto = Literal["auto"]


def _positive(**extra: Any) -> dict[str, Any]:
    return {"min": 0, "exclusive": True, **extra}


@dataclass(frozen=True)
class DataParams:
    url: str
    sha256: str | None = field(metadata={"pattern": r"[0-9a-fA-F]{64}", "what": "64 hex digits"})
    val_fraction: float = field(metadata={"min": 0, "max": 1})


@dataclass(frozen=True)
class ModelParams:
    arch: str
    weights: str


@dataclass(frozen=True)
class PreprocessParams:
    """Each key is a value, or ``auto`` to take it from the pretrained weights' metadata."""

    resize: int | Auto = field(metadata=_positive())
    crop: int | Auto = field(metadata=_positive())
    interpolation: Literal["nearest", "bilinear", "bicubic", "auto"]
    mean: list[float] | Auto = field(metadata={"length": 3})
    std: list[float] | Auto = field(metadata={"length": 3, "min": 0, "exclusive": True})


@dataclass(frozen=True)
class ModeParams:
    epochs: int = field(metadata=_positive())
    lr: float = field(metadata=_positive())
    momentum: float = field(metadata={"min": 0})
    weight_decay: float = field(metadata={"min": 0})
    step_size: int = field(metadata=_positive())
    gamma: float = field(metadata=_positive())


@dataclass(frozen=True)
class FinetuneParams(ModeParams):
    sync_batchnorm: bool


@dataclass(frozen=True)
class FeatureExtractParams(ModeParams):
    batchnorm: Literal["frozen", "update"]
    views: int | Auto = field(metadata={"min": 0})

    def view_count(self) -> int:
        """Augmented views per training image the features stage computes (0: no augmentation)."""
        return self.epochs if self.views == "auto" else self.views


@dataclass(frozen=True)
class DistributedParams:
    """Processes that train together (see :mod:`transfer.distributed`)."""

    nproc_per_node: int = field(metadata=_positive())
    nnodes: int = field(metadata=_positive())
    backend: Literal["auto", "nccl", "gloo"]
    rdzv_endpoint: str | None = field(metadata={"pattern": r"[^:\s]+:\d+", "what": "host:port"})


@dataclass(frozen=True)
class TrainParams:
    batch_size: int = field(metadata=_positive())
    amp: bool
    deterministic: bool
    finetune: FinetuneParams
    feature_extract: FeatureExtractParams
    distributed: DistributedParams

    def mode(self, name: str) -> ModeParams:
        return getattr(self, name)


@dataclass(frozen=True)
class EvaluateParams:
    grid_images: int = field(metadata=_positive())


@dataclass(frozen=True)
class RuntimeParams:
    """How the stages run, not what they compute: no stage declares these in dvc.yaml."""

    threads: int | Auto = field(metadata=_positive())
    num_workers: int | Auto = field(metadata={"min": 0})
    inference_batch_size: int = field(metadata=_positive())
    image_cache_mb: int = field(metadata={"min": 0})
    download_retries: int = field(metadata={"min": 0})
    download_timeout: float = field(metadata=_positive())
    max_unpacked_mb: int = field(metadata=_positive())


@dataclass(frozen=True)
class Params:
    seed: int = field(metadata={"min": 0})
    device: str
    data: DataParams
    model: ModelParams
    preprocess: PreprocessParams
    train: TrainParams
    evaluate: EvaluateParams
    runtime: RuntimeParams

    def select(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of dotted ``keys`` (``train.finetune``, ``seed``), as plain data."""
        tree = dataclasses.asdict(self)
        values = {}
        for key in keys:
            node: Any = tree
            for part in key.split("."):
                node = node[part]
            values[key] = node
        return values

    def digest(self, keys: Iterable[str]) -> str:
        """A short hash of the params ``keys`` (those a stage declares), recorded beside its
        outputs to trace their origin."""
        blob = json.dumps(self.select(keys), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise :class:`UserError` naming the first bad key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found: run the stage from the project's root") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    params = parse(Params, raw, source=str(path))
    ParamError.source = str(path)
    return params


def parse(cls: type, raw: Any, source: str = "params.yaml", prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from ``raw``, checking keys, types and ranges."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {where} must be a mapping of keys, got {_show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(
            f"{source}: unknown key {prefix}{unknown[0]} (known keys in {where}: {', '.join(fields)})"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, fld in fields.items():
        key = f"{prefix}{name}"
        if name not in raw:
            raise UserError(f"{source}: missing key {key}")
        values[name] = _convert(hints[name], raw[name], key, source, fld.metadata)
    return cls(**values)


def _convert(hint: Any, value: Any, key: str, source: str, meta: typing.Mapping[str, Any]) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, source, f"{key}.")
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key, source, meta)
            except UserError as exc:
                errors.append(exc)
        if len(errors) == 1:  # `X | None`: X's own message is the precise one
            raise errors[0]
        raise UserError(f"{source}: {key} must be {_describe(hint, meta)}, got {_show(value)}")
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise UserError(f"{source}: {key} must be {_describe(hint, meta)}, got {_show(value)}")
        return value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list) or ("length" in meta and len(value) != meta["length"]):
            raise UserError(f"{source}: {key} must be {_describe(hint, meta)}, got {_show(value)}")
        return [_convert(item, v, key, source, meta) for v in value]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str) and value != "",
    }[hint]
    if ok and "pattern" in meta and not re.fullmatch(meta["pattern"], value):
        raise UserError(f"{source}: {key} must be {meta['what']} or null, got {_show(value)}")
    if not ok or not _in_range(value, meta):
        raise UserError(f"{source}: {key} must be {_describe(hint, meta)}, got {_show(value)}")
    return float(value) if hint is float else value


def _in_range(value: Any, meta: typing.Mapping[str, Any]) -> bool:
    if isinstance(value, (str, bool)):
        return True
    if "min" in meta and not (value > meta["min"] if meta.get("exclusive") else value >= meta["min"]):
        return False
    return "max" not in meta or value < meta["max"]


def _describe(hint: Any, meta: typing.Mapping[str, Any]) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(h, meta) for h in typing.get_args(hint))
    if origin is Literal:
        return " or ".join(repr(v) for v in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        size = f"{meta['length']} " if "length" in meta else ""
        noun = {int: "integers", float: "numbers", str: "strings"}.get(item, _describe(item, meta))
        return f"a list of {size}{noun}{_range(item, meta)}"
    if hint is type(None):
        return "null"
    name = {bool: "true or false", int: "an integer", float: "a number", str: "a non-empty string"}[hint]
    return name + _range(hint, meta)


def _range(hint: Any, meta: typing.Mapping[str, Any]) -> str:
    if hint not in (int, float):
        return ""
    text = f" {'>' if meta.get('exclusive') else '>='} {meta['min']}" if "min" in meta else ""
    return text + (f" and < {meta['max']}" if "max" in meta else "")


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
