"""Resuming an interrupted ``train@<mode>``: a run stopped after epoch ``k`` and started again
ends with the same checkpoint bytes, history and results as a run that never stopped; only a
run with the same inputs, params and code picks a saved state up; SIGTERM stops a run the
way Ctrl-C does (exit status, one line, outputs and state left as they should be).

The Ctrl-C of a terminal (SIGINT to the process group of a running ``dvc repro``) is tested
through the real DVC CLI in ``test_pipeline_train_e2e.py``.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, leftovers, processes_in_group, stage_env, torchrun_here, wait_for
from imagefolders import (
    assert_same_run,
    checkpoint,
    make_image_folders,
    run_training,
    tiny_params,
    train_argv,
)

import stages.train
from transfer.checkpoints import CheckpointMeta, read_meta
from transfer.interrupts import Interrupted
from transfer.params import load_params
from transfer.resume import FOLDER, ResumeState, Training, code_digests, restore, rng_states, run_key
from transfer.training import EpochRecord, Progress

#: A schedule that changes the learning rate after epoch 2, so a resumed epoch 3 is only
#: right if the scheduler's state came back (and the momentum, and the best epoch so far).
RECIPE = {"epochs": 3, "step_size": 2, "gamma": 0.1}
STEPS_PER_EPOCH = 3  # 2 classes x 6 training images, batches of 4


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 classes x (6 train + 4 val) 32x32 images."""
    return make_image_folders(tmp_path_factory.mktemp("data") / "hymenoptera_data")


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, data: Path, weights: Path) -> Callable[[str], Path]:
    """``straight(mode)``: the outputs of an uninterrupted run of ``mode`` with :data:`RECIPE`,
    made once for all the tests that compare a resumed run with it."""
    runs: dict[str, Path] = {}

    def run(mode: str) -> Path:
        if mode not in runs:
            runs[mode] = train(tmp_path_factory.mktemp("straight"), mode, data, weights, recipe(mode), "out")
        return runs[mode]

    return run


def recipe(mode: str, **changes: Any) -> dict[str, Any]:
    return {f"train.{mode}.{key}": value for key, value in {**RECIPE, **changes}.items()}


def train(tmp_path: Path, mode: str, data: Path, weights: Path, changes: dict[str, Any], name: str) -> Path:
    return run_training(mode, tiny_params(tmp_path / f"{name}.params.yaml", changes), data, weights, tmp_path / name)


def history_epochs(path: Path) -> list[int]:
    with path.open(newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def states(out: Path) -> list[str]:
    """The resume states under ``out`` (the stage keeps them beside its checkpoint)."""
    folder = out / FOLDER
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def interrupt_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the ``step``-th optimizer step raise KeyboardInterrupt, as Ctrl-C would there."""
    original, calls = torch.optim.SGD.step, [0]

    def step_or_stop(self: torch.optim.SGD, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == step:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step_or_stop)


# --------------------------------------------------------------------------- the key


def test_the_key_follows_inputs_params_and_mode_only(tmp_path: Path, data: Path, weights: Path) -> None:
    """A declared param, a byte of an image or of the weights, or the mode give another key;
    a ``runtime.*`` param (how fast, not what) or the same files in another folder do not."""
    cpu = torch.device("cpu")

    def key(changes: dict[str, Any] | None = None, mode: str = "finetune", inputs: Path = data,
            weights_file: Path = weights) -> str:
        params = load_params(tiny_params(tmp_path / "params.yaml", changes))
        tracked = stages.train.tracked_params(mode)
        return run_key(mode, params, tracked, [inputs, weights_file, weights_file.with_suffix(".json")], cpu,
                       "stages.train")

    base = key()
    assert re.fullmatch(r"[0-9a-f]{16}", base)
    assert key() == base
    assert key({"runtime.threads": 2, "runtime.num_workers": 2, "runtime.image_cache_mb": 1}) == base
    copy = Path(shutil.copytree(data, tmp_path / "copy"))
    assert key(inputs=copy) == base
    assert key({"train.finetune.lr": 0.01}) != base
    assert key({"seed": 1}) != base
    assert key(mode="feature_extract") != base
    image = copy / "train" / "ants" / "ants_train_0.png"
    pixels = bytearray(image.read_bytes())
    pixels[-20] ^= 1  # same size, same name, one bit
    image.write_bytes(bytes(pixels))
    assert key(inputs=copy) != base
    other_weights = tmp_path / "w" / "pretrained.pt"
    other_weights.parent.mkdir()
    other_weights.write_bytes(weights.read_bytes() + b"\0")
    other_weights.with_suffix(".json").write_bytes(weights.with_suffix(".json").read_bytes())
    assert key(weights_file=other_weights) != base


def test_the_key_follows_the_code_the_stage_runs_only() -> None:
    """The code in the key is the train stage and what it imports, as many files as it loads
    whatever else the process has loaded: predict's docstring is none of it."""
    import stages.predict  # noqa: F401 (loaded here, and still not in the key)

    code = code_digests("stages.train")
    assert {"stages/train.py", "transfer/training.py", "transfer/models.py", "transfer/strategies.py"} <= set(code)
    assert not {"stages/predict.py", "stages/evaluate.py", "stages/compare.py"} & set(code)


# --------------------------------------------------------------------------- the state file


def test_state_round_trip(tmp_path: Path) -> None:
    """What is saved comes back: model, optimizer (momentum), scheduler, progress, and every
    random generator (a draw after restoring is the draw after saving); the file loads with
    ``weights_only=True``; saving removes another run's state of the mode, not the other mode's."""
    def training() -> Training:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return {"model": model, "optimizer": optimizer,
                "scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)}

    saved = training()
    saved["model"](torch.ones(4, 3)).sum().backward()
    saved["optimizer"].step()
    saved["scheduler"].step()
    progress = Progress(epoch=1, best_acc=0.5, best_epoch=1, best_state={"w": torch.arange(3.0)},
                        history=[EpochRecord(1, 0.7, 0.5, 0.6, 0.5, 0.1)], epoch_seconds=[1.5],
                        train_seconds=1.0, scaler={})
    folder = tmp_path / FOLDER
    folder.mkdir()
    (folder / "finetune-0000000000000000.pt").write_bytes(b"another run's")
    (folder / "feature_extract-0000000000000000.pt").write_bytes(b"the other mode's")
    state = ResumeState(folder, "finetune", "1234567890abcdef")
    state.save(saved, progress, [rng_states(torch.device("cpu"))])
    draws = torch.rand(3), random.random(), np.random.rand()
    assert states(tmp_path) == ["feature_extract-0000000000000000.pt", "finetune-1234567890abcdef.pt"]

    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    loaded = state.load()
    assert loaded is not None
    fresh = training()
    got = restore(loaded, fresh, torch.device("cpu"))
    assert (torch.rand(3).tolist(), random.random(), np.random.rand()) == (draws[0].tolist(), *draws[1:])
    assert got.history == progress.history and got.best_acc == 0.5 and got.epoch_seconds == [1.5]
    assert torch.equal(got.best_state["w"], progress.best_state["w"])
    for key, value in saved["model"].state_dict().items():
        assert torch.equal(fresh["model"].state_dict()[key], value)
    momentum = [s["momentum_buffer"] for s in fresh["optimizer"].state_dict()["state"].values()]
    assert len(momentum) == 2 and all(m.abs().sum() > 0 for m in momentum)
    assert fresh["scheduler"].get_last_lr() == saved["scheduler"].get_last_lr() == [0.05]
    assert torch.load(state.path, weights_only=True)["key"] == "1234567890abcdef"

    state.remove()
    assert states(tmp_path) == ["feature_extract-0000000000000000.pt"]


def test_unreadable_state_is_not_used(tmp_path: Path) -> None:
    """A torn or foreign file under the run's own name is refused with a reason, not loaded."""
    state = ResumeState(tmp_path, "finetune", "1234567890abcdef")
    assert state.load() is None
    state.path.write_bytes(b"PK\3\4 half a zip")
    with pytest.raises(ValueError):
        state.load()
    torch.save({"format": 1, "key": "another"}, state.path)
    with pytest.raises(ValueError, match="not written by this version for this run"):
        state.load()


# --------------------------------------------------------------------------- resuming a run


@pytest.mark.parametrize("mode", ["finetune", "feature_extract", "lp_ft"])
def test_interrupted_run_resumes_to_the_same_results(mode: str, tmp_path: Path, data: Path, weights: Path,
                                                     straight: Callable[[str], Path],
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C in epoch 3, after one of its optimizer steps: the stage says where it stopped,
    writes no checkpoint or run record, leaves the history of epochs 1-2 and the state after
    epoch 2. Started again, it says it resumes after epoch 2 and ends with the checkpoint
    (byte for byte), sidecar, history and results of a run that was never interrupted, and
    removes the state. (lp_ft's runs start with feature_extract's one epoch, as in dvc repro.)"""
    assert states(straight(mode)) == []

    before = STEPS_PER_EPOCH if mode == "lp_ft" else 0
    interrupt_at_step(monkeypatch, before + 2 * STEPS_PER_EPOCH + 2)
    with pytest.raises(Interrupted) as stopped:
        train(tmp_path, mode, data, weights, recipe(mode), "resumed")
    out = tmp_path / "resumed"
    (state,) = states(out)
    assert stopped.value.detail == (
        f"train@{mode} stopped after epoch 2 of 3 and saved its state in {out / FOLDER / state}; run it again "
        "with the same inputs and params (dvc repro) to resume from there")
    assert not (out / f"{mode}.pt").exists() and not (out / f"{mode}.json").exists()
    assert not (out / mode / "train.json").exists()
    assert history_epochs(out / mode / "history.csv") == [1, 2]
    assert leftovers(out) == leftovers(out / mode) == leftovers(out / FOLDER) == []
    monkeypatch.undo()
    capsys.readouterr()

    train(tmp_path, mode, data, weights, recipe(mode), "resumed")
    printed = capsys.readouterr().out
    assert f"train@{mode}: resuming after epoch 2 of 3 (state from {out / FOLDER / state})" in printed
    assert "Epoch 1/3" not in printed and "Epoch 3/3" in printed
    assert_same_run(straight(mode), out, mode)
    assert states(out) == [] and not (out / FOLDER).exists()


def test_other_params_do_not_pick_up_the_state(tmp_path: Path, data: Path, weights: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """After an interrupted run, a run with another learning rate starts from epoch 1 and says
    why it does not resume; once it has finished, the stale state is gone."""
    interrupt_at_step(monkeypatch, STEPS_PER_EPOCH + 1)
    with pytest.raises(Interrupted):
        train(tmp_path, "finetune", data, weights, recipe("finetune", epochs=2), "out")
    out = tmp_path / "out"
    (stale,) = states(out)
    monkeypatch.undo()
    capsys.readouterr()

    train(tmp_path, "finetune", data, weights, recipe("finetune", epochs=2, lr=0.01), "out")
    printed = capsys.readouterr().out
    assert f"train@finetune: not resuming from {out / FOLDER / stale}: it is the state of a run with other " \
           "inputs, params or code" in printed
    assert "resuming after" not in printed and "Epoch 1/2" in printed
    assert history_epochs(out / "finetune" / "history.csv") == [1, 2]
    assert not (out / FOLDER).exists()


def test_damaged_state_is_reported_and_training_starts_over(tmp_path: Path, data: Path, weights: Path,
                                                           straight: Callable[[str], Path],
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A state torn under the run's own name (a disk that filled up, a copy cut short) cannot
    be resumed from, but must not fail the run or be ignored in silence: one warning names the
    file, and the run trains from epoch 1 to the results of a run that never stopped."""
    interrupt_at_step(monkeypatch, STEPS_PER_EPOCH + 1)
    with pytest.raises(Interrupted):
        train(tmp_path, "finetune", data, weights, recipe("finetune"), "out")
    out = tmp_path / "out"
    (name,) = states(out)
    state = out / FOLDER / name
    state.write_bytes(state.read_bytes()[:100] + b"\0garbage")
    monkeypatch.undo()
    capsys.readouterr()

    train(tmp_path, "finetune", data, weights, recipe("finetune"), "out")
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: cannot resume")]
    assert len(warnings) == 1, captured.err
    assert re.fullmatch(rf"warning: cannot resume from {re.escape(str(state))} \(.+\); starting from epoch 1",
                        warnings[0]), warnings[0]
    assert "resuming after" not in captured.out and "Epoch 1/3" in captured.out
    assert history_epochs(out / "finetune" / "history.csv") == [1, 2, 3]
    assert json.loads((out / "finetune" / "train.json").read_text())["resumed_after_epoch"] is None
    assert_same_run(straight("finetune"), out, "finetune")
    assert states(out) == [] and not (out / FOLDER).exists()


def test_interrupted_before_an_epoch_finished(tmp_path: Path, data: Path, weights: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C in epoch 1: nothing to resume, and the line says so."""
    interrupt_at_step(monkeypatch, 2)
    with pytest.raises(Interrupted) as stopped:
        train(tmp_path, "finetune", data, weights, recipe("finetune"), "out")
    assert stopped.value.detail == ("train@finetune stopped during epoch 1 of 3, before any epoch finished: "
                                    "nothing was written to the stage's outputs and there is nothing to resume")
    out = tmp_path / "out"
    assert states(out) == [] and not (out / "finetune").exists() and not (out / "finetune.pt").exists()


# --------------------------------------------------------------------------- SIGTERM

def sigterm_after_an_epoch(argv: list[str], out: Path) -> tuple[int, str]:
    """Start the train stage with ``argv`` in a process group of its own and, once an epoch's
    state is on disk, send SIGTERM to the whole group (as systemd and Kubernetes signal every
    process of a job). Its exit status and stderr, after checking that no process is left."""
    process = subprocess.Popen([sys.executable, "-m", "stages.train", *argv], cwd=REPO_ROOT, env=stage_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: bool(states(out)), process)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert processes_in_group(process.pid) == [], "a process of the stage outlived it"
    return process.returncode, stderr


#: The SIGTERM tests' epochs: enough that the run is still going when the signal comes (an
#: epoch of the tests' small backbone takes a tenth of a second), well after the first.
SIGTERM_EPOCHS = 8


def stopped_after_epoch(line: str, out: Path) -> int:
    """The epoch after which the stage's ``interrupted by SIGTERM`` line says it stopped."""
    match = re.fullmatch(rf"interrupted by SIGTERM: train@finetune stopped after epoch (\d) of {SIGTERM_EPOCHS} and "
                         rf"saved its state in {re.escape(str(out / FOLDER))}/finetune-[0-9a-f]{{16}}\.pt; run it "
                         r"again with the same inputs and params \(dvc repro\) to resume from there", line)
    assert match, line
    return int(match.group(1))



@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_stops_training_like_ctrl_c(tmp_path: Path, data: Path, weights: Path,
                                           straight: Callable[[str], Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """``kill`` (SIGTERM) to the process group of a running train stage with a DataLoader
    worker (as systemd and Kubernetes signal every process of a job), after its first epoch:
    exit status 143, one ``interrupted by SIGTERM`` line and no traceback, no checkpoint or
    run record, no temporary file, the history and the state of the finished epochs, no
    process left behind. Started again (with the same params: the loader worker changes
    nothing), it resumes and ends with an uninterrupted run's results."""
    changes = {**recipe("finetune", epochs=SIGTERM_EPOCHS), "runtime.num_workers": 1}
    params = tiny_params(tmp_path / "params.yaml", changes)
    out = tmp_path / "out"
    argv = train_argv("finetune", params, data, weights, out)
    returncode, stderr = sigterm_after_an_epoch(argv, out)

    assert returncode == 143, stderr
    assert "Traceback" not in stderr, stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("interrupted")]
    done = stopped_after_epoch(line, out)
    assert 1 <= done < SIGTERM_EPOCHS
    assert not (out / "finetune.pt").exists() and not (out / "finetune" / "train.json").exists()
    assert history_epochs(out / "finetune" / "history.csv") == list(range(1, done + 1))
    assert len(states(out)) == 1
    assert leftovers(out) == leftovers(out / "finetune") == leftovers(out / FOLDER) == []

    capsys.readouterr()
    stages.train.main(argv)  # in this process: a second start-up would cost more than the training
    assert f"train@finetune: resuming after epoch {done} of {SIGTERM_EPOCHS}" in capsys.readouterr().out
    assert_same_run(train(tmp_path, "finetune", data, weights, changes, "straight"), out, "finetune")
    assert not (out / FOLDER).exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_two_processes_stopped_by_sigterm_resume_to_the_same_results(tmp_path: Path, data: Path, weights: Path,
                                                                     straight: Callable[[str], Path],
                                                                     capfd: pytest.CaptureFixture[str]) -> None:
    """The same through torchrun on 2 processes. Uninterrupted, process 0 speaks and writes:
    each line once, no temporary file, the record says 2 processes, the checkpoint is the
    single-process run's plain state_dict and sidecar in format. SIGTERM to all of them and to
    torchrun (as systemd and Kubernetes send) after the first epoch: 143, the one line of
    process 0 and nothing else (not torchrun's report), no process left. Started again,
    process 0 reads the state and hands it to the other, and the run ends as the
    uninterrupted 2-process run did, bit for bit. (The uninterrupted and the resumed run start
    their processes from this one, the stopped run from a process of its own.)"""
    # 64-pixel crops: at 32 the last BatchNorm layers of the small backbone see 1x1 maps of a
    # process's 2 images of a step, whose normalisation can blow up (one process sees all 4).
    params = tiny_params(tmp_path / "params.yaml", {**recipe("finetune", epochs=SIGTERM_EPOCHS),
                                                    "train.distributed.nproc_per_node": 2,
                                                    "preprocess.resize": 72, "preprocess.crop": 64})
    two = tmp_path / "two"
    capfd.readouterr()
    with torchrun_here():
        stages.train.main(train_argv("finetune", params, data, weights, two))
    said = capfd.readouterr().out
    last = f"Epoch {SIGTERM_EPOCHS}/{SIGTERM_EPOCHS}"
    assert said.count(last) == said.count("train@finetune: best val acc") == 1, said
    assert "2 processes" in said and json.loads((two / "finetune" / "train.json").read_text())["processes"] == 2
    single = straight("finetune")
    assert checkpoint(two, "finetune").keys() == checkpoint(single, "finetune").keys()
    meta_two, meta_single = (read_meta(out / "finetune.pt", CheckpointMeta) for out in (two, single))
    assert meta_two.model_dump(include={"strategy", "classes", "head"}) == \
        meta_single.model_dump(include={"strategy", "classes", "head"})
    assert leftovers(two) == leftovers(two / "finetune") == []

    out = tmp_path / "out"
    argv = train_argv("finetune", params, data, weights, out)
    returncode, stderr = sigterm_after_an_epoch(argv, out)
    assert returncode == 143, stderr
    (line,) = [line for line in stderr.splitlines() if line.strip()]
    done = stopped_after_epoch(line, out)
    assert not (out / "finetune.pt").exists() and leftovers(out) == leftovers(out / FOLDER) == []

    with torchrun_here():
        stages.train.main(argv)
    assert f"train@finetune: resuming after epoch {done} of {SIGTERM_EPOCHS}" in capfd.readouterr().out
    assert_same_run(two, out, "finetune")
