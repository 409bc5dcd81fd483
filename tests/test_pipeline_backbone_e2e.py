"""Another backbone on another data set, through the real DVC CLI, with no code changes:
``dvc repro`` of the whole pipeline in a throw-away copy of the repository, configured only
in params.yaml.

The data set is a local folder of three generated classes with ``train/`` only (validation
is split off by ``data.val_fraction``); the backbone is torchvision's MobileNetV3-Small,
started from a local ``.pth`` state_dict the test writes (random, with randomised BatchNorm
statistics). 32-pixel images, one epoch, one thread per stage: about a minute, which runs
in the background beside the session's shared pipeline build where there is one.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from conftest import CLASS_COLOURS, make_image
from dvc_pipeline import (
    Background,
    background,
    beside_pipeline,
    declared_stages,
    new_repo,
    ran_stages,
    run_in_background,
)
from imagefolders import TINY_TRAIN, make_image_folders, random_state_dict, save_state_dict

MODES = ("finetune", "feature_extract")
CLASSES = ("cats", "dogs", "owls")  # names the code has never seen


def train_only_folder(root: Path) -> Path:
    """``root/train/<class>/*.png``, 6 images per class, and no ``val/``."""
    make_image_folders(root, classes=CLASSES, n_train=6, n_val=0)
    shutil.rmtree(root / "val", ignore_errors=True)
    assert sorted(p.name for p in root.iterdir()) == ["train"]
    return root


BACKBONE_TEST = "test_repro_with_mobilenet_on_a_local_three_class_folder"
WEIGHTS_SEED = 3


@beside_pipeline(BACKBONE_TEST, "with")
def start_repro(base: Path) -> Background:
    """``dvc repro`` of a fresh copy configured only in params.yaml, in the background (where
    the session builds its shared pipeline, this runs beside it; see dvc_pipeline)."""
    folder = train_only_folder(base / "my-images")
    weights = save_state_dict(random_state_dict("mobilenet_v3_small", seed=WEIGHTS_SEED),
                              base / "weights" / "mobilenet_v3_small.pth")
    repo = new_repo(base, {  # one torch thread per stage: 32-pixel images, threads cost more than they save
        **TINY_TRAIN,
        "data.url": str(folder),
        "data.sha256": None,
        "data.val_fraction": 0.34,
        "model.arch": "mobilenet_v3_small",
        "model.weights": str(weights),
        "runtime.inference_batch_size": 8,
        "evaluate.grid_images": 4,
    })
    return run_in_background(repo, ["repro"], base, weights=weights)


def test_repro_with_mobilenet_on_a_local_three_class_folder(tmp_path: Path) -> None:
    """Every stage runs; the classes, their count and the split come from the folder; the
    weights file reaches the trained model; evaluate and predict use the trained backbone."""
    run = background(BACKBONE_TEST) or start_repro(tmp_path)
    proc = run.result(timeout=600)
    dvc_repo, weights = run.repo, run.extra["weights"]
    state = random_state_dict("mobilenet_v3_small", seed=WEIGHTS_SEED)
    root = dvc_repo.root
    assert set(ran_stages(proc.stdout)) == set(declared_stages(root)), proc.stdout

    data = json.loads((root / "reports" / "data.json").read_text())
    assert data["classes"] == 3 and data["val_split_from_train"] == 0.34
    assert data["train"]["per_class"] == {c: 4 for c in CLASSES}  # round(6 * 0.34) = 2 of 6 to val
    assert data["val"]["per_class"] == {c: 2 for c in CLASSES}

    pretrained = json.loads((root / "models" / "pretrained.json").read_text())
    assert pretrained["arch"] == "mobilenet_v3_small" and pretrained["source"] == str(weights)
    assert pretrained["preprocess"] is None  # a local file has no metadata: ImageNet defaults

    for mode in MODES:
        meta = json.loads((root / "models" / f"{mode}.json").read_text())
        assert meta["arch"] == "mobilenet_v3_small" and meta["classes"] == list(CLASSES)
        assert meta["head"] == "classifier.3"
        assert meta["preprocess"] == {"resize": 40, "crop": 32, "interpolation": "bilinear",
                                      "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
        trained = torch.load(root / "models" / f"{mode}.pt", map_location="cpu", weights_only=True)
        assert trained["classifier.3.weight"].shape == (3, 1024)
        evaluation = json.loads((root / "metrics" / f"{mode}.json").read_text())
        assert evaluation["images"] == 6 and evaluation["best_epoch"] == meta["epoch"] == 1, evaluation
        assert 0 <= evaluation["ci95_low"] <= evaluation["accuracy"] <= evaluation["ci95_high"] <= 1
        with (root / "plots" / mode / "classes.csv").open(newline="") as f:
            assert [row["class"] for row in csv.DictReader(f)] == list(CLASSES)
    trained = torch.load(root / "models" / "feature_extract.pt", map_location="cpu", weights_only=True)
    backbone = [k for k in state if not k.startswith("classifier.3.")]
    assert all(torch.equal(trained[k], state[k]) for k in backbone), "feature_extract changed the backbone"

    query = tmp_path / "query.png"
    query.write_bytes(make_image(CLASS_COLOURS[1], 48, "query"))
    predicted = subprocess.run([sys.executable, "-m", "stages.predict", "--strategy", "feature_extract", str(query)],
                               cwd=root, env=dvc_repo.env, capture_output=True, text=True, timeout=120, check=False)
    assert predicted.returncode == 0, predicted.stderr
    path, label, confidence = predicted.stdout.strip().split("\t")
    assert path == str(query) and label in CLASSES and 1 / 3 <= float(confidence) <= 1
