"""params.yaml, read once and validated against a typed schema (docs/params.md says what each
key does).

The schema is a tree of frozen dataclasses, and params.yaml must hold exactly its keys, so the
code holds no second set of defaults. Each field is bounded by what its consumer accepts
(numpy's seeds, a C int, finite floats), and a dataclass may check its fields together
(``check``). Whatever is wrong fails at start-up with one line naming the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from transfer.errors import ParamError, UserError
from transfer.strategies import STRATEGIES, Recipe

Auto = Literal["auto"]
#: Counts go to torch and the operating system as C ints.
MAX_INT = 2**31 - 1
#: A params file larger than this, or whose YAML aliases expand to more nodes, is refused
#: before it is built: a "billion laughs" file expands a few lines into gigabytes.
MAX_BYTES, MAX_NODES = 1 << 20, 10_000
#: A float written as YAML 1.1 reads it as a string (``1e-3``: no dot).
FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _gt(bound: float, **extra: Any) -> dict[str, Any]:
    return {"gt": bound, **extra}


@dataclass(frozen=True)
class DataParams:
    url: str
    sha256: str | None = field(metadata={"pattern": r"[0-9a-fA-F]{64}", "what": "64 hex digits"})
    val_fraction: float = field(metadata={"ge": 0, "lt": 1})
    test_fraction: float = field(metadata={"ge": 0, "lt": 1})


@dataclass(frozen=True)
class ModelParams:
    arch: str
    weights: str


@dataclass(frozen=True)
class PreprocessParams:
    """Each key is a value, or ``auto`` to take it from the pretrained weights' metadata."""

    resize: int | Auto = field(metadata=_gt(0))
    crop: int | Auto = field(metadata=_gt(0))
    interpolation: Literal["nearest", "bilinear", "bicubic", "auto"]
    mean: list[float] | Auto = field(metadata={"length": 3})
    std: list[float] | Auto = field(metadata={"length": 3, "gt": 0})

    def check(self) -> tuple[str, str] | None:
        if isinstance(self.crop, int) and isinstance(self.resize, int) and self.crop > self.resize:
            return "crop", crop_problem(self.crop, self.resize)
        return None


def crop_problem(crop: int, resize: int) -> str:
    return (f"is {crop}, larger than preprocess.resize ({resize}): validation would pad its crops with black "
            "where training crops have none; make crop at most resize")


@dataclass(frozen=True)
class DistributedParams:
    """Processes that train together (see :mod:`transfer.distributed`)."""

    nproc_per_node: int = field(metadata=_gt(0))
    nnodes: int = field(metadata=_gt(0))
    backend: Literal["auto", "nccl", "gloo"]
    rdzv_endpoint: str | None = field(metadata={"pattern": r"[^:\s]+:\d+", "what": "host:port"})


@dataclass(frozen=True)
class TrainParams:
    batch_size: int = field(metadata=_gt(0))
    amp: bool
    deterministic: bool
    distributed: DistributedParams
    #: ``train.<name>`` for each strategy of :data:`transfer.strategies.STRATEGIES`, in its schema.
    strategies: dict[str, Recipe] = field(metadata={"table": STRATEGIES})

    def recipe(self, strategy: str) -> Recipe:
        return self.strategies[strategy]


@dataclass(frozen=True)
class EvaluateParams:
    grid_images: int = field(metadata=_gt(0))


@dataclass(frozen=True)
class RuntimeParams:
    """How the stages run, not what they compute: no stage declares these in dvc.yaml."""

    threads: int | Auto = field(metadata=_gt(0, le=1024))  # OpenMP allocates for them all at once
    num_workers: int | Auto = field(metadata={"ge": 0, "le": 256})  # a process each
    inference_batch_size: int = field(metadata=_gt(0))
    image_cache_mb: int = field(metadata={"ge": 0})
    download_retries: int = field(metadata={"ge": 0, "le": 100})
    download_timeout: float = field(metadata=_gt(0, le=10**9))  # seconds; sockets take up to about 9e9
    max_unpacked_mb: int = field(metadata=_gt(0))


@dataclass(frozen=True)
class Params:
    seed: int = field(metadata={"ge": 0, "le": 2**32 - 1})  # numpy's seeds are 32-bit
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
        tree["train"] |= tree["train"].pop("strategies")  # train.<strategy>, as in params.yaml
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
    params = parse(Params, read_yaml(path, what="run the stage from the project's root"), source=str(path))
    ParamError.source = str(path)
    return params


def read_yaml(path: Path, what: str) -> Any:
    """The YAML document in ``path``, refused in bounded time and memory when it is larger
    than :data:`MAX_BYTES` or its aliases expand past :data:`MAX_NODES` nodes. ``what``: what
    to do when the file is missing."""
    try:
        with path.open("rb") as file:
            text = file.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"{path} not found: {what}") from None
    if len(text) > MAX_BYTES:
        raise UserError(f"{path} is larger than {MAX_BYTES >> 20} MiB, which no params file needs; refused")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()  # aliases are references to one node here, not copies
        if node is not None and _expanded(node, {}) > MAX_NODES:
            raise UserError(f"{path}: its YAML aliases expand to more than {MAX_NODES:,} values (a \"billion "
                            "laughs\" file?); refused before building it")
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise UserError(f"{path} nests deeper than a params file can; refused") from None
    finally:
        loader.dispose()


def _expanded(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many nodes ``node`` is with its aliases expanded (each shared node counted once per
    use), computed once per distinct node and capped just past :data:`MAX_NODES`."""
    if id(node) not in sizes:
        sizes[id(node)] = MAX_NODES + 1  # a cycle (a recursive alias) is too large too
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else
                    node.value if isinstance(node, yaml.SequenceNode) else [])
        total = 1
        for child in children:
            total = min(total + _expanded(child, sizes), MAX_NODES + 1)
        sizes[id(node)] = total
    return sizes[id(node)]


def parse(cls: type, raw: Any, source: str = "params.yaml", prefix: str = "") -> Any:
    """Build the dataclass ``cls`` from ``raw``, checking keys, types and ranges, then the
    dataclass's own ``check`` of its fields together. A field with a ``table`` (name ->
    record with a ``recipe`` schema) takes one key per name of the table."""
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {where} must be a mapping of keys, got {_show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    tables = {f.name: f.metadata["table"] for f in fields.values() if "table" in f.metadata}
    keys = [name for name in fields if name not in tables] + [key for table in tables.values() for key in table]
    unknown = sorted(set(raw) - set(keys), key=str)
    if unknown:
        raise UserError(f"{source}: unknown key {prefix}{unknown[0]} (known keys in {where}: {', '.join(keys)})")
    missing = [key for key in keys if key not in raw]
    if missing:
        raise UserError(f"{source}: missing key {prefix}{missing[0]}")
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], raw[name], f"{prefix}{name}", source, fld.metadata)
              for name, fld in fields.items() if name not in tables}
    for name, table in tables.items():
        values[name] = {key: parse(record.recipe, raw[key], source, f"{prefix}{key}.") for key, record in table.items()}
    built = cls(**values)
    problem = built.check() if hasattr(built, "check") else None
    if problem:
        raise UserError(f"{source}: {prefix}{problem[0]} {problem[1]}")
    return built


def _convert(hint: Any, value: Any, key: str, source: str, meta: Mapping[str, Any]) -> Any:
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
    if hint is float and isinstance(value, str) and FLOAT.fullmatch(value):
        value = float(value)  # 1e-3, as people write it
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value),
        str: isinstance(value, str) and value != "",
    }[hint]
    if ok and "pattern" in meta and not re.fullmatch(meta["pattern"], value):
        raise UserError(f"{source}: {key} must be {meta['what']} or null, got {_show(value)}")
    if not ok or not _in_range(value, hint, meta):
        raise UserError(f"{source}: {key} must be {_describe(hint, meta)}, got {_show(value)}")
    return float(value) if hint is float else value


def _bounds(hint: Any, meta: Mapping[str, Any]) -> dict[str, Any]:
    """The field's bounds, with a C int's maximum for every integer not bounded lower."""
    if hint is int and "le" not in meta and "lt" not in meta:
        return {**meta, "le": MAX_INT}
    return dict(meta)


def _in_range(value: Any, hint: Any, meta: Mapping[str, Any]) -> bool:
    if hint not in (int, float):
        return True
    checks = {"gt": value.__gt__, "ge": value.__ge__, "lt": value.__lt__, "le": value.__le__}
    return all(checks[name](bound) for name, bound in _bounds(hint, meta).items() if name in checks)


def _describe(hint: Any, meta: Mapping[str, Any]) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(h, meta) for h in typing.get_args(hint))
    if origin is Literal:
        return " or ".join(repr(v) for v in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        size = f"{meta['length']} " if "length" in meta else ""
        noun = {int: "integers", float: "finite numbers", str: "strings"}.get(item, _describe(item, meta))
        return f"a list of {size}{noun}{_range(item, meta)}"
    if hint is type(None):
        return "null"
    name = {bool: "true or false", int: "an integer", float: "a finite number", str: "a non-empty string"}[hint]
    return name + _range(hint, meta)


def _range(hint: Any, meta: Mapping[str, Any]) -> str:
    if hint not in (int, float):
        return ""
    signs = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    return " and".join(f" {signs[name]} {bound:,}" if bound >= 10**6 else f" {signs[name]} {bound}"
                       for name, bound in _bounds(hint, meta).items() if name in signs)


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
