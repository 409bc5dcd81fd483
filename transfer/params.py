"""params.yaml, read once and validated against its schema (docs/params.md says what each key
does).

params.yaml must hold exactly the schema's keys, so the code holds no second set of defaults.
Each field is bounded by what its consumer accepts (numpy's seeds, a C int, finite floats);
whatever is wrong fails at start-up with one line naming the file and the key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field

from transfer.errors import UserError, one_line
from transfer.schema import Schema, validate
from transfer.strategies import Count, CountOrZero, FeatureExtractRecipe, FinetuneRecipe, Positive

#: No params file needs more; a larger one (the wrong file) is refused before it is parsed.
MAX_BYTES = 1 << 20
#: The longest image side preprocessing may ask for: beyond it a single decoded image needs
#: gigabytes (50,000 px is 7.5 GB), and no backbone trains on such sizes.
MAX_SIDE = 4096


def _no_nul(text: str) -> str:
    if "\0" in text:
        raise ValueError("must not contain a NUL byte")
    return text


Text = Annotated[str, Field(min_length=1), AfterValidator(_no_nul)]
Auto = Literal["auto"]
Fraction = Annotated[float, Field(ge=0, lt=1)]
Probability = Annotated[float, Field(ge=0, le=1)]
Side = Annotated[int, Field(gt=0, le=MAX_SIDE)]
Interpolation = Literal["nearest", "bilinear", "bicubic"]
Mean = Annotated[list[float], Field(min_length=3, max_length=3)]
Std = Annotated[list[Positive], Field(min_length=3, max_length=3)]


class DataParams(Schema):
    url: Text
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None
    val_fraction: Fraction
    test_fraction: Fraction
    train_per_class: Count | Literal["all"]


class ModelParams(Schema):
    arch: Text
    weights: Text


class PreprocessParams(Schema):
    """Each key is a value, or ``auto`` to take it from the pretrained weights' metadata."""

    resize: Side | Auto
    crop: Side | Auto
    interpolation: Literal[Interpolation, "auto"]
    mean: Mean | Auto
    std: Std | Auto


class DistributedParams(Schema):
    """Processes that train together (see :mod:`transfer.distributed`)."""

    nproc_per_node: Count
    nnodes: Count
    backend: Literal["auto", "nccl", "gloo"]
    rdzv_endpoint: Annotated[str, Field(pattern=r"^[^:\s]+:\d+$")] | None


class TrainParams(Schema):
    batch_size: Count
    amp: bool
    deterministic: bool
    #: ``train.<name>`` for each strategy of :data:`transfer.strategies.STRATEGIES`.
    finetune: FinetuneRecipe
    feature_extract: FeatureExtractRecipe
    lp_ft: FinetuneRecipe
    distributed: DistributedParams


class EvaluateParams(Schema):
    grid_images: Count


class RuntimeParams(Schema):
    """How the stages run, not what they compute: no stage declares these in dvc.yaml."""

    threads: Annotated[int, Field(gt=0, le=1024)] | Auto  # OpenMP allocates for them all at once
    num_workers: Annotated[int, Field(ge=0, le=256)] | Auto  # a process each
    inference_batch_size: Count
    image_cache_mb: CountOrZero
    download_retries: Annotated[int, Field(ge=0, le=100)]
    download_timeout: Annotated[float, Field(gt=0, le=10**9)]  # seconds; sockets take up to about 9e9
    max_unpacked_mb: Count


class Params(Schema):
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)]  # numpy's seeds are 32-bit
    device: Text
    data: DataParams
    model: ModelParams
    preprocess: PreprocessParams
    train: TrainParams
    evaluate: EvaluateParams
    runtime: RuntimeParams

    def select(self, keys: Iterable[str]) -> dict[str, Any]:
        """The values of dotted ``keys`` (``train.finetune``, ``seed``), as plain data."""
        tree = self.model_dump()
        return {key: functools.reduce(operator.getitem, key.split("."), tree) for key in keys}

    def digest(self, keys: Iterable[str]) -> str:
        """A short hash of the params ``keys`` (those a stage declares), recorded beside its
        outputs to trace their origin."""
        return json_digest(self.select(keys))


def json_digest(data: Any) -> str:
    """A short hash of ``data`` as JSON with sorted keys: equal for equal data, in any process."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class ParamsLoader(yaml.SafeLoader):
    """YAML as DVC reads params.yaml: a key given twice is an error (DVC refuses such a file;
    PyYAML would keep the last), and ``1e-3`` is a number (YAML 1.2), not a string."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                                  list("-+0123456789."))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise :class:`UserError` naming the first bad key."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            text = file.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"{path} not found: run the stage from the project's root") from None
    if len(text) > MAX_BYTES:
        raise UserError(f"{path} is larger than {MAX_BYTES >> 20} MiB, which no params file needs; refused")
    try:
        raw = yaml.load(text, Loader=ParamsLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {one_line(exc)}") from None
    except RecursionError:
        raise UserError(f"{path} nests deeper than a params file can; refused") from None
    return validate(Params, raw, str(path))
