"""The training half of the pipeline through the real DVC CLI, on the session's reproduced
pipeline (``dvc_pipeline.shared_pipeline``: a tiny generated data set, weights ``none``,
32-pixel images, two epochs): the outputs of ``train@finetune`` (trained on the images) and
``train@feature_extract`` (trained on the features stage's stored backbone outputs) are what
later stages and users load, and a change to one mode's params reruns only that mode.

DVC commands target the ``train`` stages (and so everything upstream of them: fetch, unzip,
weights, features); the evaluation and preview stages downstream belong to other tests.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import find_metrics
from dvc_pipeline import MODES, PIPELINE_PARAMS, Pipeline, copy_repo, dvc_json, ran_stages

from transfer.checkpoints import load_trained_model, pretrained_classifier
from transfer.reproducibility import seed_everything

#: history.csv's columns: the per-epoch numbers and nothing that differs between identical runs.
HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]



def test_repro_trains_both_modes_and_reruns_only_what_changed(pipeline: Pipeline, tmp_path: Path) -> None:
    root = pipeline.repo.root
    shown = dvc_json(pipeline.repo, "metrics", "show")
    # What both modes start from: with weights `none`, models/pretrained.pt is empty and the
    # backbone is torch's initialisation from the seed, built as the stages build it (the
    # global generators are given back afterwards).
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        seed_everything(PIPELINE_PARAMS["seed"])
        start, _ = pretrained_classifier(root / "models" / "pretrained.pt",
                                         json.loads((root / "models" / "pretrained.json").read_text()), 2, 32)
    random.setstate(states[0])
    np.random.set_state(states[1])
    pretrained = start.state_dict()
    for mode in MODES:
        state = torch.load(root / "models" / f"{mode}.pt", map_location="cpu", weights_only=True)
        assert state["fc.weight"].shape == (2, 512)
        assert set(state) == set(pretrained), f"{mode}: the checkpoint is not the whole classifier"
        meta = json.loads((root / "models" / f"{mode}.json").read_text())
        assert meta["mode"] == mode and meta["arch"] == "resnet18" and meta["epoch"] in (1, 2)
        assert meta["classes"] == ["ants", "bees"] and meta["weights"] == "none"
        model, _ = load_trained_model(root / "models" / f"{mode}.pt", torch.device("cpu"))
        with torch.no_grad():
            assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 2)

        with (root / "plots" / mode / "history.csv").open(newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        assert reader.fieldnames == HISTORY_COLUMNS
        assert [row["epoch"] for row in rows] == ["1", "2"]
        best = max(rows, key=lambda row: (float(row["val_acc"]), -int(row["epoch"])))
        assert meta["epoch"] == int(best["epoch"]) and meta["val_acc"] == pytest.approx(float(best["val_acc"]))

        record = json.loads((root / "reports" / mode / "train.json").read_text())
        assert record["epochs"] == 2 and record["best_epoch"] == meta["epoch"]
        assert 0 <= record["best_val_acc"] <= 1 and len(record["epoch_seconds"]) == 2
        assert record["loader_workers"] == 0 and record["threads"] == 1

        # The evaluation of this checkpoint is what DVC shows (and `dvc metrics diff` compares).
        metrics = find_metrics(shown, f"metrics/{mode}.json")
        assert metrics is not None, shown
        assert metrics["best_epoch"] == meta["epoch"]

    # feature_extract trained the head alone, on the features stage's stored outputs.
    head_only = torch.load(root / "models" / "feature_extract.pt", map_location="cpu", weights_only=True)
    backbone = [k for k in pretrained if not k.startswith("fc.")]
    assert all(torch.equal(head_only[k], pretrained[k]) for k in backbone), "feature_extract changed the backbone"
    assert not torch.equal(head_only["fc.weight"], pretrained["fc.weight"]), "feature_extract left the head"
    finetuned = torch.load(root / "models" / "finetune.pt", map_location="cpu", weights_only=True)
    assert not torch.equal(finetuned["conv1.weight"], pretrained["conv1.weight"]), "finetune left the backbone"
    features = json.loads((root / "data" / "features" / "features.json").read_text())
    assert features["views"] == 2 and features["classes"] == ["ants", "bees"]  # views: auto = one per epoch
    assert len(features["samples"]["train"]) == 8 and len(features["samples"]["val"]) == 6

    # Everything is up to date; a change to one mode's recipe reruns that mode only.
    repo = copy_repo(pipeline.repo, tmp_path)
    assert dvc_json(repo, "status", "train") == {}
    repo.set_params({"train.feature_extract.lr": 0.01})
    status = dvc_json(repo, "status", "train")
    assert set(status) == {"train@feature_extract"}, status
    assert "train.feature_extract" in json.dumps(status)

    dry = repo.dvc("repro", "--dry", "train")
    assert ran_stages(dry.stdout) == ["train@feature_extract"], dry.stdout
    assert set(dvc_json(repo, "status", "train")) == {"train@feature_extract"}, "--dry changed something"
