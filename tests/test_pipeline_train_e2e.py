"""The training half of the pipeline through the real DVC CLI, in a throw-away copy of the
repository: ``dvc repro`` builds both modes from a tiny generated data set, the outputs are
what later stages and users load, and a change to one mode's params reruns only that mode.

The data set is a zip on the local disk (``data.url`` may be a path), the weights are
``none`` (no download), and images are 32x32, so the run takes seconds on two CPU cores.
DVC commands target the ``train`` stages (and so everything upstream of them: fetch, unzip,
weights); the evaluation and preview stages downstream belong to other tests.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DvcRepo, make_dataset_zip

from tests.imagefolders import TINY_TRAIN
from transfer.checkpoints import load_trained_model

MODES = ("finetune", "feature_extract")
DATA_AND_WEIGHTS = {"fetch", "unzip", "weights"}


def dvc_json(repo: DvcRepo, *args: str) -> dict[str, Any]:
    """Run a ``dvc ... --json`` command and parse its output."""
    return json.loads(repo.dvc(*args, "--json").stdout)


def workspace_metrics(repo: DvcRepo) -> dict[str, Any]:
    """``dvc metrics show``'s files of the workspace (keyed "workspace" or "" by version)."""
    (revision,) = dvc_json(repo, "metrics", "show").values()
    return revision["data"]


def ran_stages(output: str) -> set[str]:
    """The stages ``dvc repro`` says it runs (``Running stage 'name':``)."""
    return set(re.findall(r"Running stage '([^']+)'", output))


@pytest.fixture
def built(dvc_repo: DvcRepo, tmp_path: Path) -> DvcRepo:
    """The copy, pointed at a tiny data set with tiny-training params, after ``dvc repro``."""
    archive = make_dataset_zip(tmp_path / "src" / "hymenoptera_data.zip", extra=("gif", "litter"))
    dvc_repo.set_params({**TINY_TRAIN, "data.url": str(archive)})
    proc = dvc_repo.dvc("repro", "train", timeout=600)
    ran = ran_stages(proc.stdout)
    assert DATA_AND_WEIGHTS | {f"train@{mode}" for mode in MODES} <= ran, proc.stdout
    return dvc_repo


def test_repro_trains_both_modes_and_reruns_only_what_changed(built: DvcRepo) -> None:
    root = built.root
    for mode in MODES:
        state = torch.load(root / "models" / f"{mode}.pt", map_location="cpu", weights_only=True)
        assert state["fc.weight"].shape == (2, 512)
        meta = json.loads((root / "models" / f"{mode}.json").read_text())
        assert meta["mode"] == mode and meta["arch"] == "resnet18" and meta["epoch"] == 1
        assert meta["classes"] == ["ants", "bees"]
        model, _ = load_trained_model(root / "models" / f"{mode}.pt", torch.device("cpu"))
        with torch.no_grad():
            assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)

        with (root / "plots" / mode / "history.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert [row["epoch"] for row in rows] == ["1"]
        train = json.loads((root / "metrics" / mode / "train.json").read_text())
        assert train["epochs"] == 1 and 0 <= train["best_val_acc"] <= 1

    # Both modes' metrics are visible to DVC (and so to `dvc metrics diff` and Studio).
    shown = workspace_metrics(built)
    for mode in MODES:
        metrics = shown[f"metrics/{mode}/train.json"]["data"]
        assert metrics["best_epoch"] == 1 and "best_val_acc" in metrics

    # Everything is up to date; a change to one mode's recipe reruns that mode only.
    assert dvc_json(built, "status", "train") == {}
    built.set_params({"train.feature_extract.lr": 0.01})
    status = dvc_json(built, "status", "train")
    assert set(status) == {"train@feature_extract"}, status
    assert "train.feature_extract" in json.dumps(status)

    dry = built.dvc("repro", "--dry", "train")
    assert ran_stages(dry.stdout) == {"train@feature_extract"}, dry.stdout
    assert set(dvc_json(built, "status", "train")) == {"train@feature_extract"}, "--dry changed something"
