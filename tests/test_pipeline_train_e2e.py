"""The training half of the pipeline through the real DVC CLI, on the session's reproduced
pipeline (``dvc_pipeline.shared_pipeline``: a tiny generated data set, weights ``none``,
32-pixel images, two epochs): the outputs of ``train@finetune`` (trained on the images) and
``train@feature_extract`` (trained on the features stage's stored backbone outputs) are what
later stages and users load, and a change to one mode's params reruns only that mode.

DVC commands target the ``train`` stages (and so everything upstream of them: fetch, unzip,
weights, features); the evaluation and preview stages downstream belong to other tests.
A Ctrl-C during ``dvc repro`` leaves a state that the next ``dvc repro`` resumes from, to
the same results as a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
import torch
import yaml
from conftest import CLASS_COLOURS, find_metrics, leftovers, make_image
from dvc_pipeline import (
    ARCH,
    CLASSES,
    HEAD,
    MODES,
    PIPELINE_PARAMS,
    Background,
    Pipeline,
    background,
    beside_pipeline,
    copy_repo,
    dvc_json,
    local_cache,
    run_cache_entries,
    run_in_background,
    workspace_lock,
)
from imagefolders import RESULTS, assert_close_outputs, load_trained

import stages.predict
import stages.train
from transfer.checkpoints import PretrainedMeta, pretrained_classifier, read_meta
from transfer.reproducibility import seed_everything

#: history.csv's columns: the per-epoch numbers and nothing that differs between identical runs.
HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]


def test_repro_trains_every_strategy(pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Another backbone on another data set, configured only in params.yaml: the classes, their
    count and the split come from the folder, the weights file reaches every strategy's model,
    each strategy trains what it should, and predict uses the trained model. (What a change
    reruns: tests/test_caching_e2e.py.)"""
    root = pipeline.repo.root
    shown = dvc_json(pipeline.repo, "metrics", "show")
    data = json.loads((root / "reports" / "data.json").read_text())
    assert data["classes"] == 3 and data["val_split_from_train"] == 0.34
    assert data["train"]["per_class"] == {c: 4 for c in CLASSES}  # round(6 * 0.34) = 2 of 6 to val
    assert data["val"]["per_class"] == {c: 2 for c in CLASSES}
    meta = read_meta(root / "models" / "pretrained.pt", PretrainedMeta)
    assert (meta.arch, meta.source, meta.preprocess) == (ARCH, str(pipeline.weights), None)  # a file: no metadata
    # What every strategy starts from: the file's backbone and a new head initialised from the
    # seed, built as the stages build it (the global generators are given back afterwards).
    states = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        seed_everything(PIPELINE_PARAMS["seed"])
        start, _ = pretrained_classifier(root / "models" / "pretrained.pt", meta, 3, 32)
    random.setstate(states[0])
    np.random.set_state(states[1])
    pretrained = start.state_dict()
    for mode in MODES:
        check_strategy(root, mode, pretrained, find_metrics(shown, f"metrics/{mode}.json"))

    # feature_extract trained the head alone, on the features stage's stored outputs: every
    # backbone tensor is the file's.
    head_only = torch.load(root / "models" / "feature_extract.pt", map_location="cpu", weights_only=True)
    file = torch.load(pipeline.weights, map_location="cpu", weights_only=True)
    backbone = [k for k in pretrained if not k.startswith(HEAD + ".")]
    assert all(torch.equal(head_only[k], file[k]) for k in backbone), "feature_extract changed the backbone"
    assert not torch.equal(head_only[f"{HEAD}.weight"], pretrained[f"{HEAD}.weight"]), "feature_extract left the head"
    first_conv = next(k for k in backbone if k.endswith(".weight"))
    for name in ("finetune", "lp_ft"):
        finetuned = torch.load(root / "models" / f"{name}.pt", map_location="cpu", weights_only=True)
        assert not torch.equal(finetuned[first_conv], file[first_conv]), f"{name} left the backbone"
    # lp_ft started from feature_extract's trained head, which the lock records as its input.
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["train@lp_ft"]
    assert {"models/feature_extract.pt", "models/feature_extract.json"} <= {dep["path"] for dep in lock["deps"]}
    assert "Running stage 'train@lp_ft'" in pipeline.first_run.stdout.split("Running stage 'train@feature_extract'")[1]
    features = json.loads((root / "data" / "features" / "features.json").read_text())
    assert features["views"] == 2 and features["classes"] == list(CLASSES)  # views: auto = one per epoch
    assert len(features["samples"]["train"]) == 12 and len(features["samples"]["val"]) == 6

    query = tmp_path / "query.png"
    query.write_bytes(make_image(CLASS_COLOURS[1], 48, "query"))
    monkeypatch.chdir(root)  # in this process: a start-up of torch costs more (its command line: tests/test_predict.py)
    stages.predict.main(["--strategy", "feature_extract", str(query)])
    path, label, confidence = capsys.readouterr().out.strip().split("\t")
    assert path == str(query) and label in CLASSES and 1 / 3 <= float(confidence) <= 1


def check_strategy(root: Path, mode: str, pretrained: dict[str, torch.Tensor], metrics: dict[str, Any] | None) -> None:
    """One strategy's checkpoint, sidecar, history, run record and metrics."""
    state = torch.load(root / "models" / f"{mode}.pt", map_location="cpu", weights_only=True)
    assert state[f"{HEAD}.weight"].shape == (3, 1024)
    assert set(state) == set(pretrained), f"{mode}: the checkpoint is not the whole classifier"
    meta = json.loads((root / "models" / f"{mode}.json").read_text())
    assert meta["strategy"] == mode and meta["arch"] == ARCH and meta["head"] == HEAD
    assert meta["classes"] == list(CLASSES) and meta["weights"] == str(root.parent / "weights" / f"{ARCH}.pth")
    assert meta["preprocess"] == {"resize": 40, "crop": 32, "interpolation": "bilinear",  # ImageNet's, by default
                                  "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    model, _ = load_trained(root / "models" / f"{mode}.pt", torch.device("cpu"))
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)

    with (root / "plots" / mode / "history.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == HISTORY_COLUMNS
    assert [row["epoch"] for row in rows] == ["1", "2"]
    best = max(rows, key=lambda row: (float(row["val_acc"]), -int(row["epoch"])))
    assert meta["epoch"] == int(best["epoch"]) and meta["val_acc"] == pytest.approx(float(best["val_acc"]), abs=1e-6)

    record = json.loads((root / "reports" / mode / "train.json").read_text())
    assert record["epochs"] == 2 and record["best_epoch"] == meta["epoch"]
    assert 0 <= record["best_val_acc"] <= 1 and len(record["epoch_seconds"]) == 2
    assert record["loader_workers"] == 0 and record["threads"] == 1
    # The evaluation of this checkpoint is what DVC shows (and `dvc metrics diff` compares).
    assert metrics is not None and metrics["best_epoch"] == meta["epoch"] and metrics["images"] == 6
    with (root / "plots" / mode / "classes.csv").open(newline="") as f:
        assert [row["class"] for row in csv.DictReader(f)] == list(CLASSES)


def wait_until_ended(processes: list[psutil.Process], timeout: float) -> None:
    """Wait for processes that are not this one's children: gone, or zombies that nobody reaps
    (a container's first process may not)."""
    deadline = time.monotonic() + timeout
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            while process.status() != psutil.STATUS_ZOMBIE:
                assert time.monotonic() < deadline, f"{process.cmdline()} still runs"
                time.sleep(0.05)


def default_sigint() -> None:
    """In the child, before it runs dvc: SIGINT back to its default. A background job of a
    non-interactive shell (how CI may run pytest) starts with SIGINT ignored, and the child
    would inherit that; a terminal's Ctrl-C reaches a process that has the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


TRAIN_OUTPUTS = ("models/finetune.pt", "models/finetune.json", "plots/finetune/history.csv")


def results(record: Path) -> dict[str, Any]:
    """A run record's results (not its timings or machine)."""
    return {key: value for key, value in json.loads(record.read_text()).items() if key in RESULTS}


def test_ctrl_c_in_dvc_repro_resumes_to_the_same_results(pipeline: Pipeline, tmp_path: Path) -> None:
    """Ctrl-C the way a terminal sends it, SIGINT to the process group of a running ``dvc repro
    train@finetune``, once an epoch has finished: the stage says where it stopped and how to
    go on and exits 130 (and DVC fails), writes no checkpoint, sidecar or run
    record, and leaves the history and the resume state of the finished epochs and no
    temporary file, none of which git sees. ``dvc repro`` again resumes there, removes the
    state, and DVC records the run in its run-cache; an uninterrupted run of the stage on
    the same inputs writes the same checkpoint, sidecar and history bytes and results."""
    repo = copy_repo(pipeline.repo, tmp_path)
    epochs = 3
    repo.set_params({"train.finetune.epochs": epochs, "train.finetune.step_size": 2})
    models, resume = repo.root / "models", repo.root / "models" / ".resume"
    stdout, stderr = tmp_path / "dvc-stdout.txt", tmp_path / "dvc-stderr.txt"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "train@finetune"], cwd=repo.root,
                                   env=repo.env, stdout=out, stderr=err, start_new_session=True,
                                   preexec_fn=default_sigint)
    deadline = time.monotonic() + 180
    while not list(resume.glob("finetune-*.pt")):
        assert process.poll() is None, f"dvc repro ended first:\n{stdout.read_text()}\n{stderr.read_text()}"
        if time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail("no epoch finished in time")
        time.sleep(0.05)
    stage = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGINT)
    code = process.wait(timeout=120)
    wait_until_ended(stage, timeout=60)
    errors = stderr.read_text()

    assert code == 255, errors  # DVC's status for a stage that failed
    match = re.search(r"^interrupted by Ctrl-C \(SIGINT\): train@finetune stopped after epoch (\d) of 3 and saved "
                      r"its state in models/\.resume/finetune-[0-9a-f]{16}\.pt; run it again with the same inputs "
                      r"and params \(dvc repro\) to resume from there$", errors, re.M)
    assert match, errors
    assert "Traceback" not in errors, errors
    # 130 is the stage's own status, seen where the shell DVC runs it in execs its last command
    # (bash, zsh); dash (/bin/sh on Debian, DVC's shell where SHELL is unset) dies of the SIGINT
    # itself, and DVC reports -2 while the stage finishes on its own.
    assert re.search(r"failed to reproduce 'train@finetune'.*exited with (130|-2)$", errors, re.S | re.M), errors
    done = int(match.group(1))
    assert 1 <= done < epochs
    for path in ("models/finetune.pt", "models/finetune.json", "reports/finetune/train.json"):
        assert not (repo.root / path).exists(), path
    with (repo.root / "plots" / "finetune" / "history.csv").open(newline="") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f)] == list(range(1, done + 1))
    assert len(list(resume.iterdir())) == 1
    for folder in (models, resume, repo.root / "plots" / "finetune", repo.root / "reports" / "finetune"):
        assert leftovers(folder) == [], folder
    assert ".resume" not in repo.git("status", "--porcelain", "--untracked-files=all")

    resumed = repo.dvc("repro", "train@finetune")
    assert f"train@finetune: resuming after epoch {done} of {epochs} (state from models/.resume/finetune-" \
           in resumed.stdout, resumed.stdout
    assert not resume.exists()
    lock = workspace_lock(repo)
    runs = run_cache_entries(local_cache(repo))
    assert any({"path": "models/finetune.pt", "md5": lock["models/finetune.pt"]}.items() <= out.items()
               for run in runs for out in run["outs"]), "the resumed run is not in DVC's run-cache"

    # The same stage, uninterrupted, here (a third start-up of dvc and torch would cost more).
    straight = tmp_path / "straight"
    stages.train.main([
        "--strategy", "finetune", "--params", str(repo.root / "params.yaml"),
        "--inputs", str(repo.root / "data" / "hymenoptera_data"), "--weights", str(models / "pretrained.pt"),
        "--model-out", str(straight / TRAIN_OUTPUTS[0]), "--history", str(straight / TRAIN_OUTPUTS[2]),
        "--record", str(straight / "train.json"),
    ])
    for path in TRAIN_OUTPUTS:
        assert (straight / path).read_bytes() == (repo.root / path).read_bytes(), path
    assert results(straight / "train.json") == results(repo.root / "reports" / "finetune" / "train.json")
    assert results(straight / "train.json")["epochs"] == epochs


def outputs(root: Path, mode: str) -> tuple[list[dict[str, str]], dict[str, Any], dict[str, torch.Tensor]]:
    """A train stage's history rows, run record and checkpoint in the project ``root``."""
    with (root / "plots" / mode / "history.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    record = json.loads((root / "reports" / mode / "train.json").read_text())
    return rows, record, torch.load(root / "models" / f"{mode}.pt", map_location="cpu", weights_only=True)


TWO_PROCESSES = "test_two_processes_through_dvc_repro"


@beside_pipeline(TWO_PROCESSES, "after")
def start_two_processes(base: Path, pipeline: Pipeline) -> Background:
    """``dvc repro train@feature_extract`` on 2 processes, in the background on a copy of the
    shared pipeline as soon as it is built; what ``dvc status`` said before goes with it."""
    repo = copy_repo(pipeline.repo, base)
    repo.set_params({"train.distributed.nproc_per_node": 2})
    return run_in_background(repo, ["repro", "train@feature_extract"], base, status=dvc_json(repo, "status"))


def test_two_processes_through_dvc_repro(pipeline: Pipeline, tmp_path: Path) -> None:
    """``train.distributed.nproc_per_node: 2`` makes a train stage out of date (not the features,
    which are the same from any number of processes), and it runs through torchrun on 2 gloo
    processes: its summary and epochs printed once (process 0 writes and speaks), no temporary
    file, a plain state_dict with the single-process run's keys and sidecar, and (the head has
    no BatchNorm) the single process's weights and history to float rounding, so its metrics
    count every image once. (finetune on 2 processes, whose BatchNorm normalises each process's
    share of a step: tests/test_resume.py; the loop on a network without BatchNorm:
    tests/test_distributed.py.)"""
    started = background(TWO_PROCESSES) or start_two_processes(tmp_path, pipeline)
    repo, run, mode = started.repo, started.result(), "feature_extract"
    assert {"train@finetune", "train@feature_extract", "train@lp_ft"} <= set(started.extra["status"]), "not declared"
    assert "'features' didn't change" in run.stdout, run.stdout
    assert run.stdout.count("Epoch 2/2") == 1, run.stdout  # once, not per process
    assert run.stdout.count(f"train@{mode}: best val acc") == 1, run.stdout
    assert f"{mode}: {ARCH}" in run.stdout and "2 processes" in run.stdout, run.stdout
    for folder in (repo.root / "models", repo.root / "plots" / mode, repo.root / "reports" / mode):
        assert leftovers(folder) == [], folder
    rows, record, state = outputs(repo.root, mode)
    single = outputs(pipeline.repo.root, mode)
    assert record["processes"] == 2 and single[1]["processes"] == 1
    meta = json.loads((repo.root / "models" / f"{mode}.json").read_text())
    assert meta.keys() == json.loads((pipeline.repo.root / "models" / f"{mode}.json").read_text()).keys()
    assert [row["epoch"] for row in rows] == ["1", "2"] and record["epochs"] == 2
    assert_close_outputs(single, (rows, record, state))
    status = repo.dvc("status", f"train@{mode}").stdout
    assert status.strip() == "Data and pipelines are up to date.", status
