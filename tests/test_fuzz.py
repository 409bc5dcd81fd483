"""Property-based tests (Hypothesis) of every parser of outside input: params files, evaluate's
predictions.csv, checkpoint sidecars and the features stage's metadata, and paths given as
``data.url`` or ``model.weights``. The property is the project's promise for bad input: a valid
result, or one ``UserError`` line (through a stage: exit status 1 and one ``error:`` line),
never another exception. The example counts are small, to keep the suite's time.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT, error_line, set_keys
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import stages.fetch
from stages.compare import right_answers
from transfer.checkpoints import CheckpointMeta
from transfer.errors import UserError
from transfer.params import Params, load_params
from transfer.preprocess import IMAGENET
from transfer.schema import read_json
from transfer.stage import run_stage
from transfer.stored_features import FeaturesMeta

FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
COMMITTED = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))

#: Values YAML and JSON can hold, nested a little.
VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=4), max_leaves=8)


def dotted_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, dict):
            keys += dotted_keys(value, f"{prefix}{key}.")
    return keys


KEYS = dotted_keys(COMMITTED)


def one_problem_or_params(path: Path) -> None:
    try:
        assert isinstance(load_params(path), Params)
    except UserError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(path)), str(exc)


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=1, max_size=3))
@example(changes={"train": {}, "train.finetune.epochs": None})  # found so: the test's own KeyError
def test_params_with_any_values_load_or_name_one_problem(tmp_path: Path, changes: dict[str, Any]) -> None:
    path = tmp_path / "params.yaml"
    try:
        raw = set_keys(COMMITTED, changes)
    except (TypeError, KeyError):  # a change replaced a section (by a value, or by {}) and a later one
        return                     # goes inside what is no longer there: no params file to write
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    one_problem_or_params(path)


@FUZZ
@given(text=st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1")))
def test_any_text_as_params_loads_or_names_one_problem(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    one_problem_or_params(path)


@FUZZ
@given(lines=st.lists(st.lists(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=8), max_size=5),
                      max_size=5), header=st.booleans())
@example(lines=[["a.png", "ants\r", "ants", "0.9"]], header=True)  # found so: a carriage return was a traceback
def test_any_predictions_csv_is_read_or_refused_in_one_line(lines: list[list[str]], header: bool) -> None:
    rows = [["path", "actual", "predicted", "confidence"]] * header + lines
    text = "\n".join(",".join(row) for row in rows)
    try:
        answers = right_answers(text, "p.csv")
    except UserError as exc:
        assert str(exc).startswith("p.csv") and "\n" not in str(exc)
    else:
        assert answers and all(isinstance(v, bool) for v in answers.values())


SIDECAR = {"strategy": "finetune", "arch": "resnet18", "classes": ["ants", "bees"], "head": "fc", "epoch": 3,
           "val_acc": 0.9, "weights": "none", "weights_source": "none", "weights_sha256": None,
           "preprocess": IMAGENET.model_dump(), "params_digest": "0123456789abcdef"}
FEATURES = {"arch": "resnet18", "weights": "none", "head": "fc", "classes": ["ants", "bees"], "feature_shape": [512],
            "views": 2, "batchnorm": "frozen", "preprocess": IMAGENET.model_dump(),
            "samples": {"train": [["ants/a.png", 0]], "val": [["bees/b.png", 1]]}, "params_digest": "0"}


@FUZZ
@given(schema=st.sampled_from([(CheckpointMeta, SIDECAR), (FeaturesMeta, FEATURES)]),
       changes=st.lists(st.tuples(st.integers(0, 30), VALUES, st.booleans()), max_size=3))
def test_damaged_sidecars_and_features_metadata_are_named(tmp_path: Path, schema: tuple[Any, dict[str, Any]],
                                                          changes: list[tuple[int, Any, bool]]) -> None:
    model, good = schema
    raw = copy.deepcopy(good)
    keys = sorted(raw)
    for index, value, delete in changes:
        key = keys[index % len(keys)]
        if delete:
            raw.pop(key, None)
        else:
            raw[key] = value
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(raw), encoding="utf-8")
    try:
        assert isinstance(read_json(path, model, "the stage"), model)
    except UserError as exc:
        assert str(exc).startswith(f"{path} is not") and "\n" not in str(exc), str(exc)


@FUZZ
@given(url=st.text(alphabet=st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40)
       .filter(lambda u: not u.lower().startswith(("http:", "https:"))))
def test_any_local_data_url_ends_in_one_line(tmp_path: Path, url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Folders, missing files, names too long, NUL bytes, ``~nosuchuser``, odd schemes: the
    fetch stage packs or copies what it is given or exits 1 with one line."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(set_keys(COMMITTED, {"data.url": url})), encoding="utf-8")
    argv = ["--params", str(params), "--out", str(tmp_path / "out.zip"), "--report", str(tmp_path / "r.json")]
    try:
        run_stage(stages.fetch.main, argv)
    except SystemExit as exc:
        assert exc.code == 1
        error_line(capsys.readouterr().err)
