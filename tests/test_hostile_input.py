"""Hostile and careless input ends in one clear line naming the param or file, with a non-zero
exit where nothing useful can be done: no traceback, no hang, nothing written that should not
be, earlier outputs intact. (Params that expand, are out of a library's range or not finite,
and inconsistent preprocessing: tests/test_params.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import DELETE, REPO_ROOT, error_line, leftovers, make_image, stage_env
from imagefolders import make_image_folders, run_training, tiny_params, train_argv

import stages.evaluate
import stages.fetch
import stages.predict
import stages.train
import stages.unzip
import stages.weights
from transfer.stage import run_stage


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 classes x (5 train + 3 val): the last step of 4 holds 2 images, a batch of 3 leaves one."""
    return make_image_folders(tmp_path_factory.mktemp("data") / "images", n_train=5, n_val=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, data: Path, weights: Path) -> Path:
    """A finetune checkpoint (and its sidecar) to damage in copies."""
    out = tmp_path_factory.mktemp("trained")
    return run_training("finetune", tiny_params(out / "params.yaml"), data, weights, out) / "finetune.pt"


@contextlib.contextmanager
def pipe(path: Path) -> Iterator[Path]:
    """A named pipe at ``path`` whose other end feeds a few bytes to whoever opens it: code
    that reads it gets garbage instead of blocking for ever, so a test of the refusal fails,
    not hangs, where the refusal is missing."""
    os.mkfifo(path)

    def feed() -> None:
        with contextlib.suppress(BrokenPipeError):  # released unread, below
            path.write_bytes(b"not an image")

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        yield path
    finally:
        if feeder.is_alive():  # nobody read it, as it should be: release the feeder
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        feeder.join(timeout=5)


def fails(main: Any, argv: list[str], capsys: pytest.CaptureFixture[str], code: int = 1) -> str:
    """Run a stage's main as its command line does; the one error line it printed."""
    with pytest.raises(SystemExit) as info:
        run_stage(main, argv)
    assert info.value.code == code
    return error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- 2. a folder that is not a data set

def test_a_folder_that_is_not_a_data_set_is_refused_before_anything_is_packed(tmp_path: Path,
                                                                                 capsys: pytest.CaptureFixture[str]
                                                                                 ) -> None:
    """data.url naming the wrong folder (a home folder, say) packs nothing into the zip DVC
    would cache and push; a data set folder packs its images and nothing else."""
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "passwords.txt").write_text("secret")
    (home / ".ssh").mkdir()
    (home / ".ssh" / "id_rsa").write_text("private key")
    out = tmp_path / "out"
    argv = ["--params", str(tiny_params(tmp_path / "params.yaml", {"data.url": str(home)})),
            "--out", str(out / "data.zip"), "--report", str(out / "fetch.json")]
    line = fails(stages.fetch.main, argv, capsys)
    assert line.startswith(f"error: {home} is not an image-folder data set: no train/ split (found nothing)")
    assert "nothing was packed" in line and not out.exists()

    folder = make_image_folders(tmp_path / "set", n_train=2, n_val=1)
    (folder / "train" / "ants" / "notes.txt").write_text("my notes")
    (folder / "train" / "ants" / ".DS_Store").write_bytes(b"\0")
    (folder / "README.md").write_text("not data")
    argv = ["--params", str(tiny_params(tmp_path / "p2.yaml", {"data.url": str(folder)})),
            "--out", str(out / "data.zip"), "--report", str(out / "fetch.json")]
    with pipe(folder / "train" / "bees" / "fifo.png"):  # would block the packer for ever
        run_stage(stages.fetch.main, argv)
    names = zipfile.ZipFile(out / "data.zip").namelist()
    assert sorted(names) == sorted(f"{split}/{cls}/{cls}_{split}_{i}.png" for split, n in (("train", 2), ("val", 1))
                                   for cls in ("ants", "bees") for i in range(n))


def test_a_named_pipe_as_data_url_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "data.zip"
    argv = ["--params", str(tiny_params(tmp_path / "params.yaml", {"data.url": str(fifo)})),
            "--out", str(tmp_path / "out" / "data.zip"), "--report", str(tmp_path / "out" / "fetch.json")]
    with pipe(fifo):
        assert fails(stages.fetch.main, argv, capsys).startswith(f"error: {fifo} is not a regular file")


# --------------------------------------------------------------------------- 4. divergence

def test_a_diverging_run_stops_with_one_line_and_writes_nothing(tmp_path: Path, data: Path, weights: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """An lr so large that the loss turns NaN (or infinite) in the first epoch: the stage stops
    there, says so and what to try, writes no checkpoint, metrics, history or resume state, and
    exits 1. (Before, it trained to the end, kept a NaN epoch as best and exited 0.)"""
    params = tiny_params(tmp_path / "params.yaml", {"train.finetune.lr": 1e12, "train.finetune.epochs": 3})
    out = tmp_path / "out"
    line = fails(stages.train.main, train_argv("finetune", params, data, weights, out), capsys)
    assert line.startswith("error: train@finetune: the loss became ")
    assert "in epoch 1; nothing was written. The learning rate is too large for this model and data: lower " \
           "train.finetune.lr" in line
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))


def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path: Path, trained: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """predict (and evaluate) refuse a checkpoint whose weights are NaN, instead of printing
    ``nan`` confidences."""
    state = torch.load(trained, weights_only=True)
    state["fc.weight"] = torch.full_like(state["fc.weight"], float("nan"))
    damaged = tmp_path / "nan.pt"
    torch.save(state, damaged)
    shutil.copy(trained.with_suffix(".json"), damaged.with_suffix(".json"))
    image = tmp_path / "x.png"
    image.write_bytes(make_image((200, 40, 40), 32, "x"))
    line = fails(stages.predict.main, ["--model", str(damaged), "--device", "cpu", str(image)], capsys)
    assert line.startswith(f"error: checkpoint {damaged} holds weights that are not finite numbers")


# --------------------------------------------------------------------------- 5. BatchNorm and one image

def test_a_last_step_of_one_image_is_left_out(tmp_path: Path, data: Path, weights: Path) -> None:
    """10 images in steps of 3 leave one: at a crop of 32 pixels BatchNorm cannot train on it
    (torch's "Expected more than 1 value per channel"), so each epoch trains on 9."""
    params = tiny_params(tmp_path / "params.yaml", {"train.batch_size": 3})
    out = run_training("finetune", params, data, weights, tmp_path / "out")
    record = json.loads((out / "finetune" / "train.json").read_text())
    assert record["epochs"] == 1


def test_a_batch_size_that_cannot_train_is_explained(tmp_path: Path, data: Path, weights: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """``train.batch_size: 1`` at a crop of 32 pixels: every step is one image, which
    BatchNorm cannot train on; the line says which params to change."""
    params = tiny_params(tmp_path / "params.yaml", {"train.batch_size": 1})
    line = fails(stages.train.main, train_argv("finetune", params, data, weights, tmp_path / "out"), capsys)
    assert line == ("error: a training step of 1 image(s) per process leaves BatchNorm one value per channel at this "
                    "crop size: raise train.batch_size (to 2 or more per process) or preprocess.crop")


# --------------------------------------------------------------------------- 7. damaged sidecars

@pytest.mark.parametrize(("change", "expected"), [
    pytest.param({"classes": DELETE}, " is not what its train stage writes (missing key classes)", id="missing-key"),
    pytest.param({"epoch": "three"}, " is not what its train stage writes (epoch: Input should be a valid integer",
                 id="wrong-type"),
    pytest.param({"preprocess": {"resize": 40}}, " is not what its train stage writes (missing key preprocess.crop)",
                 id="partial-preprocess"),
    pytest.param({"classes": ["ants"]}, " is not what its train stage writes (classes must be 2 or more different",
                 id="one-class"),
    pytest.param({"arch": "resnet999"}, ": arch 'resnet999' is not a torchvision classification model",
                 id="unknown-arch"),
])
def test_a_damaged_sidecar_names_itself(tmp_path: Path, trained: Path, data: Path, change: dict[str, Any],
                                        expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    """evaluate and predict validate the checkpoint's sidecar like params.yaml: a missing key,
    a wrong type or an unknown architecture names the sidecar, not params.yaml."""
    model = tmp_path / "model.pt"
    shutil.copy(trained, model)
    meta = json.loads(trained.with_suffix(".json").read_text())
    meta.update(change)
    meta = {k: v for k, v in meta.items() if v is not DELETE}
    model.with_suffix(".json").write_text(json.dumps(meta))
    line = fails(stages.predict.main, ["--model", str(model), "--device", "cpu", str(data)], capsys)
    assert line.startswith(f"error: {model.with_suffix('.json')}{expected}"), line
    argv = ["--strategy", "finetune", "--params", str(tiny_params(tmp_path / "params.yaml")), "--data", str(data),
            "--model", str(model), "--metrics", str(tmp_path / "m.json"), "--plots", str(tmp_path / "plots"),
            "--record", str(tmp_path / "r.json")]
    assert fails(stages.evaluate.main, argv, capsys) == line
    assert not (tmp_path / "m.json").exists() and not (tmp_path / "plots").exists()


# --------------------------------------------------------------------------- 8. special files

def test_predict_refuses_anything_but_regular_files(tmp_path: Path, trained: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A named pipe called like an image, named or inside a folder, gets its error line at
    once (it would block the reader for ever); the real image is still predicted."""
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "good.png").write_bytes(make_image((40, 60, 220), 32, "good"))
    with pipe(folder / "pipe.jpg"), pipe(tmp_path / "named.png"), pytest.raises(SystemExit) as info:
        run_stage(stages.predict.main, ["--model", str(trained), "--device", "cpu", str(folder),
                                        str(tmp_path / "named.png")])
    assert info.value.code == 1
    captured = capsys.readouterr()
    assert set(captured.err.splitlines()) == {
        f"error: {tmp_path / 'named.png'}: not a regular file (a pipe, device or socket); refused",
        f"error: {folder / 'pipe.jpg'}: not a regular file (a pipe, device or socket); refused"}
    assert f"{folder / 'good.png'}\t" in captured.out


# --------------------------------------------------------------------------- 9. the disk fills at the resume save

def test_a_resume_state_too_large_for_the_disk_is_one_line(tmp_path: Path, data: Path, weights: Path) -> None:
    """The per-epoch resume state (of the tests' ShuffleNet: about 4 MB) meets a file-size limit of 2 MB
    (``ulimit -f``, which fails writes as a full disk does): one line names the state and says
    how big it is, no traceback (torch's own writer raised a RuntimeError there), no temporary
    file left."""
    params = tiny_params(tmp_path / "params.yaml", {"train.finetune.epochs": 2})
    out = tmp_path / "out"

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))

    proc = subprocess.run([sys.executable, "-m", "stages.train", *train_argv("finetune", params, data, weights, out)],
                          cwd=REPO_ROOT, env=stage_env(), capture_output=True, text=True, timeout=120,
                          preexec_fn=limited)
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc.stderr)
    assert line.startswith("error: [Errno 27] File too large") and f"writing {out / '.resume'}/finetune-" in line, line
    size = float(line.split(".pt (")[1].split(" MB)")[0])
    assert 3 < size < 6, line
    assert leftovers(out / ".resume") == [] and not (out / "finetune.pt").exists()


# --------------------------------------------------------------------------- smaller things

def test_data_report_is_the_same_on_every_run_and_reports_leaks(tmp_path: Path, make_zip: Any,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """reports/data.json is byte-identical for the same zip (skip reasons do not carry the
    temporary folder's random name), and an image in two splits is reported as a leak."""
    archive = make_zip(tmp_path / "a.zip", extra=("corrupt",))
    with zipfile.ZipFile(archive, "a") as zf:  # a copy of a training image among the validation images
        zf.writestr("hymenoptera_data/val/ants/copy.png", zf.read("hymenoptera_data/train/ants/ants_train_0.png"))
    reports = []
    for run in ("first", "second"):
        argv = [str(archive), "--out", str(tmp_path / run / "data"), "--report", str(tmp_path / run / "data.json"),
                "--params", str(tiny_params(tmp_path / "params.yaml"))]
        run_stage(stages.unzip.main, argv)
        reports.append((tmp_path / run / "data.json").read_bytes())
    assert reports[0] == reports[1]
    report = json.loads(reports[0])
    assert "tmp" not in json.dumps(report["skipped"]), report["skipped"]
    assert report["duplicates_across_splits"] == [["train/ants/ants_train_0.png", "val/ants/copy.png"]]
    err = capsys.readouterr().err
    assert "warning: the same image is in two splits, which makes scores optimistic: train/ants/ants_train_0.png, " \
           "val/ants/copy.png" in err


@pytest.mark.parametrize(("content", "expected"), [
    pytest.param(b"hello weights\n", "is not a PyTorch weights file (it starts with b'hello we')", id="text"),
    pytest.param(None, "holds pickled Python objects beyond tensors (posix.system), which loading could run as code: "
                 "refused", id="pickle-payload"),
])
def test_weight_files_that_are_not_state_dicts(tmp_path: Path, content: bytes | None, expected: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "weights.pth"
    if content is None:
        torch.save({"w": torch.zeros(2), "payload": Payload()}, path)
    else:
        path.write_bytes(content)
    argv = ["--params", str(tiny_params(tmp_path / "params.yaml", {"model.weights": str(path)})),
            "--out", str(tmp_path / "out" / "pretrained.pt")]
    line = fails(stages.weights.main, argv, capsys)
    assert line.startswith(f"error: weights file {path} {expected}"), line
    assert not (tmp_path / "out").exists()


class Payload:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, ("echo this would run",)


def test_a_class_of_one_image_cannot_give_one_to_validation(tmp_path: Path, make_zip: Any,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    archive = make_zip(tmp_path / "a.zip", n_train=1, n_val=0)
    argv = [str(archive), "--out", str(tmp_path / "data"), "--report", str(tmp_path / "data.json"),
            "--params", str(tiny_params(tmp_path / "params.yaml", {"data.val_fraction": 0.2}))]
    line = fails(stages.unzip.main, argv, capsys)
    assert line == ("error: data.val_fraction: class ants has 1 image in train/, which cannot be split into train/ "
                    "and val/; add images or set data.val_fraction: 0")
    assert not (tmp_path / "data").exists() and not (tmp_path / "data.json").exists()
