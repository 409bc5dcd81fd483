"""The frozen backbone computed once: the ``features`` stage stores its outputs, and
``train@feature_extract`` trains the head on them. Trained that way, the head must match the
tutorial's way (the whole frozen network run on every image every epoch, here called the
uncached path) wherever the two should agree: the same stored features, the same history
and the same checkpoint, to within float rounding (tolerance 1e-5; the histories and
checkpoints agree exactly on the 2-core CPU these tests were written on), for no
augmentation, for one fresh view per epoch, for views reused in turn, and for
``batchnorm: update``, whose drifting statistics are computed once too.
"""

from __future__ import annotations

import csv
import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, error_line, leftovers, stage_env
from imagefolders import (
    checkpoint,
    features_argv,
    make_image_folders,
    random_state_dict,
    run_training,
    save_state_dict,
    tiny_params,
    train_argv,
)
from test_unzip import mount_namespace
from torch import nn, optim
from torch.optim import lr_scheduler

import stages.features
import stages.train
import stages.weights
from transfer.checkpoints import PretrainedMeta, pretrained_classifier, read_start
from transfer.datasets import EpochSampler, TrainImages, ValImages
from transfer.devices import configure_threads
from transfer.imagefolder import image_folders
from transfer.models import freeze_backbone
from transfer.params import load_params
from transfer.preprocess import ModelInput, resolve_preprocess
from transfer.reproducibility import seed_everything
from transfer.stage import run_stage
from transfer.stored_features import head_inputs
from transfer.training import WarmUp, make_loader, train_model

CPU = torch.device("cpu")
TOLERANCE = 1e-5
EPOCHS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folders(tmp_path_factory.mktemp("data") / "images", n_train=5, n_val=3)


def uncached(params_path: Path, data: Path, weights: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """The tutorial's way: the whole model (frozen backbone) over the images every epoch,
    with the same seeded order and views; the best state and the history."""
    params = load_params(params_path)
    recipe = params.train.feature_extract
    update = recipe.batchnorm == "update"
    configure_threads(params.runtime.threads)
    seed_everything(params.seed)
    pretrained = read_start(weights, PretrainedMeta, params.model)
    pre = resolve_preprocess(params.preprocess, pretrained.preprocess)
    split = image_folders(data)
    model, head = pretrained_classifier(weights, pretrained, len(split["train"].classes), pre.crop)
    trained = freeze_backbone(model, head)
    model = model.to(memory_format=torch.channels_last)
    views = recipe.epochs if recipe.views == "auto" else recipe.views
    train = TrainImages(split["train"], pre, seed=params.seed, cache_bytes=2**30, augment=views > 0)
    val = ValImages(split["val"], pre, cache_bytes=2**30)
    loaders = {
        "train": make_loader(train, EpochSampler(len(train), seed=params.seed, shuffle=True,
                                                 cycle=None if update else max(views, 1)),
                             batch_size=params.train.batch_size, workers=0, device=CPU, drop_single=True),
        "val": make_loader(val, EpochSampler(len(val), seed=params.seed, shuffle=False, cycle=1),
                           batch_size=params.train.batch_size, workers=0, device=CPU),
    }
    optimizer = optim.SGD(trained, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    scheduler = lr_scheduler.StepLR(optimizer, step_size=recipe.step_size, gamma=recipe.gamma)
    result = train_model(model, loaders, nn.CrossEntropyLoss(reduction="sum"), optimizer, scheduler, recipe.epochs, CPU,
                         prepare=ModelInput(pre, CPU),
                         warmup=None if update else WarmUp(recipe.epochs, model.get_submodule(head.name), []))
    return result.best_state, [r.as_row() for r in result.history]


def cached(tmp_path: Path, params_path: Path, data: Path,
           weights: Path) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    out = run_training("feature_extract", params_path, data, weights, tmp_path / "cached")
    state = checkpoint(out, "feature_extract")
    with (out / "feature_extract" / "history.csv").open(newline="") as f:
        history = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return state, history


@pytest.mark.parametrize("changes", [
    pytest.param({"train.feature_extract.views": 0}, id="no-augmentation"),
    pytest.param({"train.feature_extract.views": "auto"}, id="a-fresh-view-per-epoch"),
    pytest.param({"train.feature_extract.views": 2}, id="two-views-in-turn"),
    pytest.param({"train.feature_extract.batchnorm": "update"}, id="batchnorm-update"),
])
def test_cached_path_matches_the_uncached_path(tmp_path: Path, data: Path, weights: Path,
                                               changes: dict[str, Any]) -> None:
    params = tiny_params(tmp_path / "params.yaml", {"train.feature_extract.epochs": EPOCHS,
                                                    "train.feature_extract.lr": 0.05, **changes})
    cached_state, cached_history = cached(tmp_path, params, data, weights)
    reference_state, reference_history = uncached(params, data, weights)

    assert len(cached_history) == len(reference_history) == EPOCHS
    for ours, theirs in zip(cached_history, reference_history, strict=True):
        assert ours == pytest.approx({k: round(v, 6) for k, v in theirs.items()}, abs=TOLERANCE)
    assert cached_state.keys() == reference_state.keys()
    for key, value in reference_state.items():
        torch.testing.assert_close(cached_state[key], value, atol=TOLERANCE, rtol=0, msg=key)
    # The head did learn (the validation crops are fixed, so only new weights move their
    # loss), so the agreement above is not that of two runs that changed nothing.
    assert cached_history[0]["val_loss"] != cached_history[-1]["val_loss"]


def test_stored_features_are_the_backbone_outputs_of_each_view(tmp_path: Path, data: Path, weights: Path) -> None:
    """train.npy holds, for view v of image i, what the head receives for that picture;
    val.npy the same for the validation crops; features.json says what they were made of."""
    params_path = tiny_params(tmp_path / "params.yaml", {"train.feature_extract.views": 2})
    stages.features.main(features_argv(params_path, data, weights, tmp_path))
    train_features = np.load(tmp_path / "features" / "train.npy")
    val_features = np.load(tmp_path / "features" / "val.npy")
    meta = json.loads((tmp_path / "features" / "features.json").read_text())
    assert train_features.shape == (2, 10, 1024) and val_features.shape == (1, 6, 1024)
    assert meta["views"] == 2 and meta["classes"] == ["ants", "bees"] and meta["head"] == "fc"
    assert meta["samples"]["train"][0] == ["ants/ants_train_0.png", 0]

    params = load_params(params_path)
    seed_everything(params.seed)
    pretrained = read_start(weights, PretrainedMeta, params.model)
    pre = resolve_preprocess(params.preprocess, pretrained.preprocess)
    split = image_folders(data)
    model, head = pretrained_classifier(weights, pretrained, 2, pre.crop)
    model = model.eval().to(memory_format=torch.channels_last)
    train = TrainImages(split["train"], pre, seed=params.seed, cache_bytes=0)
    val = ValImages(split["val"], pre, cache_bytes=0)
    with torch.inference_mode(), head_inputs(model.get_submodule(head.name)) as captured:
        for view in (0, 1):
            for index in range(len(train)):
                model(ModelInput(pre, CPU)(train[(view, index)][0].unsqueeze(0)))
                np.testing.assert_allclose(train_features[view, index], captured.pop()[0].numpy(), atol=TOLERANCE)
        for index in range(len(val)):
            model(ModelInput(pre, CPU)(val[(0, index)][0].unsqueeze(0)))
            np.testing.assert_allclose(val_features[0, index], captured.pop()[0].numpy(), atol=TOLERANCE)
    assert not np.allclose(train_features[0], train_features[1]), "two views must differ"
    record = json.loads((tmp_path / "features.json").read_text())
    assert record["backbone_passes"] == 2 * 10 + 6 and record["wall_seconds"] > 0


def test_a_head_only_change_trains_on_the_same_features(tmp_path: Path, data: Path, weights: Path) -> None:
    """Another learning rate changes what train@feature_extract learns, not the features it
    reads (the stage's params digest covers only what changes them); other view counts do."""
    base = tiny_params(tmp_path / "base.yaml")
    out = run_training("feature_extract", base, data, weights, tmp_path / "base")
    other_lr = tiny_params(tmp_path / "lr.yaml", {"train.feature_extract.lr": 0.5})
    stages.train.main(train_argv("feature_extract", other_lr, out / "features", weights, tmp_path / "lr"))
    first = checkpoint(out, "feature_extract")
    second = checkpoint(tmp_path / "lr", "feature_extract")
    assert not torch.equal(first["fc.weight"], second["fc.weight"])


def stage_error(main: Any, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        run_stage(main, argv)
    assert info.value.code == 1
    return error_line(capsys.readouterr().err)


def test_stale_features_are_refused(tmp_path: Path, data: Path, weights: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Features computed for other views (a run by hand that skipped the features stage)
    are not trained on: one line says to rerun the features stage; nothing is written."""
    out = run_training("feature_extract", tiny_params(tmp_path / "a.yaml"), data, weights, tmp_path / "a")
    other = tiny_params(tmp_path / "b.yaml", {"train.feature_extract.views": 3})
    line = stage_error(stages.train.main, train_argv("feature_extract", other, out / "features", weights,
                                                     tmp_path / "b"), capsys)
    assert "holds features computed with other params than these: run `dvc repro`" in line
    assert not (tmp_path / "b").exists()


def test_views_must_be_auto_with_batchnorm_update(tmp_path: Path, data: Path, weights: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    params = tiny_params(tmp_path / "params.yaml", {"train.feature_extract.batchnorm": "update",
                                                    "train.feature_extract.views": 2})
    line = stage_error(stages.features.main, features_argv(params, data, weights, tmp_path), capsys)
    assert line.startswith(f"error: {params}: train.feature_extract.views must be auto with batchnorm: update")
    assert not (tmp_path / "features").exists()


def test_a_model_that_computes_after_its_head_is_refused(tmp_path: Path, data: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """SqueezeNet's head is a 1x1 convolution followed by pooling: its inputs cannot stand in
    for the model's, so the stage says to fine-tune it instead of training a wrong head."""
    params = tiny_params(tmp_path / "params.yaml", {"model.arch": "squeezenet1_1"})
    stages.weights.main(["--params", str(params), "--out", str(tmp_path / "pretrained.pt")])
    line = stage_error(stages.features.main, features_argv(params, data, tmp_path / "pretrained.pt", tmp_path),
                       capsys)
    assert "squeezenet1_1 computes more after its classification head (classifier.1)" in line
    assert "train it with finetune" in line


def test_backbone_in_worker_processes_gives_the_same_features(tmp_path: Path, data: Path, weights: Path) -> None:
    """With two threads on the CPU the frozen backbone runs in two single-threaded loader
    processes; the stored features are those of the in-process run (one thread)."""
    arrays = {}
    for threads in (1, 2):
        params = tiny_params(tmp_path / f"{threads}.yaml",
                             {"runtime.threads": threads, "train.feature_extract.views": 2})
        out = tmp_path / f"threads{threads}"
        stages.features.main(features_argv(params, data, weights, out))
        arrays[threads] = [np.load(out / "features" / name) for name in ("train.npy", "val.npy")]
        assert json.loads((out / "features.json").read_text())["threads"] == threads
    for one, two in zip(arrays[1], arrays[2], strict=True):
        np.testing.assert_allclose(one, two, atol=TOLERANCE, rtol=0)


# --------------------------------------------------------------------------- hostile input

def test_non_finite_backbone_outputs_are_refused(tmp_path: Path, data: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """"Pretrained" weights whose tensors are all scaled by 1e30 (finite, so the weights stage
    takes them) overflow to infinity and NaN inside the backbone: the stage says the features
    would not be finite numbers and what to check, and writes nothing."""
    state = {k: v * 1e30 if v.is_floating_point() else v for k, v in random_state_dict().items()}
    params = tiny_params(tmp_path / "params.yaml", {"model.weights": str(save_state_dict(state, tmp_path / "huge.pt"))})
    weights = tmp_path / "models" / "pretrained.pt"
    stages.weights.main(["--params", str(params), "--out", str(weights)])
    line = stage_error(stages.features.main, features_argv(params, data, weights, tmp_path / "out"), capsys)
    assert line.startswith("error: the backbone's outputs for train.npy are not all finite numbers, so the stored "
                           "features would not be finite numbers: check model.weights"), line
    assert f"({weights}) and preprocess.mean/std in {params}" in line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


#: A tmpfs of $SIZE at $MNT, the features stage writing its folder there (its record outside),
#: and what the stage left on the tmpfs listed into $OUTSIDE, since it vanishes with the namespace.
FULL_DISK_SCRIPT = r"""
mount -t tmpfs -o size="$SIZE" tmpfs "$MNT" || exit 97
"$PY" -m stages.features "$@" --out "$MNT/features" 2> "$OUTSIDE/stderr" > /dev/null
echo $? > "$OUTSIDE/rc"
ls -A "$MNT" > "$OUTSIDE/left"
"""


def test_too_little_space_is_refused_before_computing(tmp_path: Path, data: Path, weights: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The arrays' size is known before any image is decoded: with less free space than that,
    one line with the estimate, and nothing written."""
    params = tiny_params(tmp_path / "params.yaml", {"train.feature_extract.views": 2})
    monkeypatch.setattr(stages.features.shutil, "disk_usage", lambda _path: shutil._ntuple_diskusage(1, 1, 8192))
    line = stage_error(stages.features.main, features_argv(params, data, weights, tmp_path), capsys)
    # 2 views of 10 train images and 6 val images of 1024 floats: 106,496 bytes, 0.1 MB.
    assert line == (f"error: the features need about 0.1 MB, but {tmp_path} has 0.0 MB free: free some space "
                    "there, or store fewer views (train.feature_extract.views)"), line
    assert not (tmp_path / "features").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(("size", "expected"), [
    # Room for the arrays' bytes, so the check passes, but not for their 128-byte headers (each
    # file takes whole pages): the disk fills up while the files are made. Before, the sparse
    # memory-mapped files filled it only as they were written: SIGBUS (exit 135, no message).
    pytest.param("106496", f"error: [Errno {errno.ENOSPC}] No space left on device; writing {{mnt}}/features",
                 id="fills-up"),
])
def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, data: Path, weights: Path, size: str,
                                                    expected: str) -> None:
    """On a real small file system that fills up as the stage allocates its files: exit status
    1, one line (never SIGBUS), no temporary folder."""
    prefix = mount_namespace(tmp_path / "probe")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    params = tiny_params(tmp_path / "params.yaml", {"train.feature_extract.views": 2})
    argv = features_argv(params, data, weights, tmp_path)
    env = {**stage_env(), "MNT": str(mnt), "OUTSIDE": str(tmp_path), "SIZE": size, "PY": sys.executable}
    proc = subprocess.run([*prefix, "sh", "-c", FULL_DISK_SCRIPT, "sh", *argv[:6], *argv[8:]], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"the set-up failed ({proc.returncode}): {proc.stderr}"
    stderr = (tmp_path / "stderr").read_text()
    assert (tmp_path / "rc").read_text().strip() == "1", stderr
    assert error_line(stderr).startswith(expected.format(mnt=mnt)), stderr
    assert (tmp_path / "left").read_text() == "", "the temporary folder must be gone"
    assert not (tmp_path / "features.json").exists()


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory, data: Path, weights: Path) -> tuple[Path, Path]:
    """A params file and the features stage's folder for it."""
    root = tmp_path_factory.mktemp("stored")
    params = tiny_params(root / "params.yaml")
    stages.features.main(features_argv(params, data, weights, root))
    return params, root / "features"


def damage(folder: Path, case: str) -> Path:
    """Damage one file of the features folder as ``case`` says; the file."""
    if case == "truncated":
        path = folder / "train.npy"
        path.write_bytes(path.read_bytes()[:-1000])
    elif case == "wrong-shape":
        path = folder / "val.npy"
        np.save(path, np.zeros((1, 5, 512), np.float32))
    elif case == "float64":
        path = folder / "train.npy"
        np.save(path, np.load(path).astype(np.float64))
    elif case == "missing-key":
        path = folder / "features.json"
        meta = json.loads(path.read_text())
        del meta["feature_shape"]
        path.write_text(json.dumps(meta))
    else:
        path = folder / "features.json"
        path.write_text('{"arch": "resnet18", ')
    return path


@pytest.mark.parametrize(("case", "says"), [
    ("truncated", "is not a readable array (mmap length is greater than file size)"),
    ("wrong-shape", "holds a float32 array of shape (1, 5, 512), not float32 of shape (views, 6, 1024) as"),
    ("float64", "holds a float64 array of shape (1, 10, 1024), not float32 of shape (views, 10, 1024) as"),
    ("missing-key", "is not what the features stage writes (missing key feature_shape)"),
    ("not-json", "is not valid JSON ("),
])
def test_damaged_stored_features_are_refused(tmp_path: Path, stored: tuple[Path, Path], weights: Path, case: str,
                                             says: str, capsys: pytest.CaptureFixture[str]) -> None:
    """train@feature_extract reads back a truncated or foreign array, or a damaged
    features.json: one line that names the file and says to run the features stage again;
    nothing is trained or written."""
    params, original = stored
    folder = tmp_path / "features"
    shutil.copytree(original, folder)
    path = damage(folder, case)
    line = stage_error(stages.train.main, train_argv("feature_extract", params, folder, weights, tmp_path / "out"),
                       capsys)
    assert line.startswith(f"error: {path} {says}"), line
    assert "run the features stage again" in line
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_a_damaged_batchnorm_file_is_refused(tmp_path: Path, data: Path, weights: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """With ``batchnorm: update`` the best epoch's statistics are read back from batchnorm.pt:
    a truncated file is one line that names it, and no checkpoint is written."""
    params = tiny_params(tmp_path / "params.yaml", {"train.feature_extract.batchnorm": "update"})
    stages.features.main(features_argv(params, data, weights, tmp_path))
    path = tmp_path / "features" / "batchnorm.pt"
    path.write_bytes(path.read_bytes()[:100])
    out = tmp_path / "out"
    line = stage_error(stages.train.main, train_argv("feature_extract", params, tmp_path / "features", weights, out),
                       capsys)
    assert line.startswith(f"error: {path} is not readable ("), line
    assert line.endswith("; run the features stage again (`dvc repro --force features`)")
    assert not (out / "feature_extract.pt").exists()
