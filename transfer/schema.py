"""One way to check what the pipeline reads: params.yaml, and every file one stage writes for
another (sidecars, ``features.json``, ``predictions.csv``). Each is a pydantic model that
refuses unknown keys, wrong types and non-finite numbers; whatever is wrong is one line that
names the file, the key and, for a file a stage wrote, the stage that writes it.
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

from transfer.errors import UserError

M = TypeVar("M", bound=BaseModel)
_SHORT = reprlib.Repr()  # a value as the user wrote it, shortened (a shared YAML alias can be huge)
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 4, 4, 2


class Schema(BaseModel):
    """Strict (``"4"`` is not 4, ``1`` not true), frozen, no unknown keys, finite numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Problem(ValueError):
    """What a schema's own check (of fields together) found wrong with its ``field``."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(problem)
        self.field = field


def validate(model: type[M], raw: Any, source: str, prefix: str = "") -> M:
    """``raw`` as ``model``, or a UserError ``source: key: what`` for its first problem
    (``prefix``: where ``raw`` sits in its file, as ``preprocess.``)."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise UserError(f"{source}: {describe(exc, model, prefix)}") from None


def describe(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """The first problem, by dotted key; a union's alternatives together (``an integer or 'auto'``)."""
    errors = exc.errors()
    first = errors[0]
    key, known = _key(model, first, prefix)
    match first["type"]:
        case "extra_forbidden":
            parent = key.rpartition(".")[0]
            return f"unknown key {key} (known keys in {parent or 'the top level'}: {', '.join(known)})"
        case "missing":
            return f"missing key {key}"
        case "value_error":
            return f"{key} {first['ctx']['error']}"
        case "model_type":
            return f"{key or 'the top level'} must be a mapping of keys, got {_SHORT.repr(first['input'])}"
        case "json_invalid":
            return first["msg"]
    said = list(dict.fromkeys(e["msg"] for e in errors if _key(model, e, prefix)[0] == key))
    what = " or ".join(said).replace(" or Input should be ", " or ")
    return f"{key + ': ' if key else ''}{what}, got {_SHORT.repr(first['input'])}"


def _key(model: type[BaseModel], error: Any, prefix: str) -> tuple[str, list[str]]:
    """The dotted key of an error (its location's field names, a union's member tags and a
    list's indices dropped, and the field a :class:`Problem` names), and the keys known where
    its last part is."""
    parts: list[str] = []
    fields: dict[str, Any] = model.model_fields
    for part in error["loc"]:
        parts.append(str(part))
        node = fields[part].annotation if part in fields else None
        args = [a for a in get_args(node) if a is not type(None)]  # X of X | None
        node = args[0] if len(args) == 1 else node
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            break
        fields = node.model_fields
    problem = (error.get("ctx") or {}).get("error")
    if isinstance(problem, Problem):
        parts.append(problem.field)
    return prefix + ".".join(parts), list(fields)


def read_json(path: Path, model: type[M], writer: str) -> M:
    """The JSON file ``path`` as ``model``; a missing, damaged or wrong file is one line that
    names it and says which stage (``writer``) writes it again."""
    try:
        return model.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist: run {writer} first (`dvc repro`)") from None
    except ValidationError as exc:
        what = "valid JSON" if exc.errors()[0]["type"] == "json_invalid" else f"what {writer} writes"
        raise UserError(f"{path} is not {what} ({describe(exc, model)}); run {writer} again "
                        "(`dvc repro --force`)") from None
