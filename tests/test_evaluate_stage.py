"""The ``evaluate@<mode>`` and ``preview`` stages, run in-process on a tiny trained model.

Most checks use the *oracle* checkpoint of ``trained.py``, whose answers are known in
advance (own-colour images right, decoys wrong), so the metrics are compared with numbers
counted by hand rather than with a second implementation of the same code. The grids are
checked through a spy on the figure function (the real one still draws the PNG): which
validation images each grid shows, with which titles and frames. Reruns must give
byte-identical files, so DVC sees an unchanged stage as unchanged.
"""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import error_line, leftovers
from imagefolders import tiny_params
from PIL import Image
from trained import (
    CLASSES,
    EVAL_PARAMS,
    VAL_IMAGES,
    Trained,
    exit_code,
    is_decoy,
    single_thread,
)

from stages import evaluate as evaluate_stage
from stages import preview as preview_stage
from transfer.checkpoints import CheckpointMeta, read_meta
from transfer.datasets import ValImages
from transfer.imagefolder import image_folders

GRID = EVAL_PARAMS["evaluate.grid_images"]
OUTPUTS = ("metrics.json", "predictions.csv", "classes.csv", "predictions.png", "mistakes.png")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread (see ``trained.single_thread``)."""
    previous = single_thread()
    yield
    torch.set_num_threads(previous)


@dataclass
class GridCall:
    """What the stage asked ``save_image_grid`` to draw."""

    images: list[torch.Tensor]
    titles: list[str]
    mistakes: list[bool] | None
    suptitle: str


@pytest.fixture
def grids(monkeypatch: pytest.MonkeyPatch) -> dict[str, GridCall]:
    """Record each grid the evaluate and preview stages draw, by file name; still draw it."""
    calls: dict[str, GridCall] = {}

    def spy_on(module: Any) -> None:
        real = module.save_image_grid

        def spy(path: Path, images: list[torch.Tensor], titles: list[str], **options: Any) -> None:
            calls[Path(path).name] = GridCall(list(images), list(titles), options.get("mistakes"),
                                              options.get("suptitle", ""))
            real(path, images, titles, **options)

        monkeypatch.setattr(module, "save_image_grid", spy)

    spy_on(evaluate_stage)
    spy_on(preview_stage)
    return calls


def evaluate(trained: Trained, out: Path, *, model: Path | None = None, data: Path | None = None,
             params: Path | None = None) -> int:
    """``evaluate@finetune`` with every output under ``out``; the oracle checkpoint by default."""
    return exit_code(evaluate_stage.main, [
        "--strategy", "finetune", "--params", str(params or trained.params), "--data", str(data or trained.data),
        "--model", str(model or trained.oracle), "--metrics", str(out / "metrics.json"), "--plots", str(out),
        "--record", str(out / "record.json"),
    ])


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def val_tensors(trained: Trained, data: Path | None = None) -> dict[str, torch.Tensor]:
    """Each validation image's crop (uint8) as the stage shows it, by its predictions.csv path."""
    root = data or trained.data
    split = image_folders(root)["val"]
    dataset = ValImages(split, read_meta(trained.oracle, CheckpointMeta).preprocess, cache_bytes=0)
    return {Path(p).relative_to(root).as_posix(): dataset[(0, i)][0] for i, p in enumerate(split.paths)}


def which_files(images: list[torch.Tensor], tensors: dict[str, torch.Tensor]) -> list[str]:
    """The validation file each grid image shows (exact tensor match); fail on an unknown one."""
    found = []
    for image in images:
        matches = [name for name, tensor in tensors.items() if torch.equal(tensor, image)]
        assert len(matches) == 1, f"grid image matches {matches}"
        found.append(matches[0])
    return found


def assert_png(path: Path) -> None:
    """A real, non-blank PNG picture."""
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 100 and image.height >= 100
        extrema = image.convert("L").getextrema()
    assert extrema[0] < extrema[1], f"{path} is a blank picture"


def title(row: dict[str, str]) -> str:
    return f"predicted: {row['predicted']} ({float(row['confidence']):.0%})\nactual: {row['actual']}"


def test_eval_json_matches_hand_count(trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The oracle gets the 3+3 own-colour images right and the 2+1 decoys wrong, so:

    ants: 5 images, 4 predicted ants (3 right): precision 3/4, recall 3/5, F1 6/9
    bees: 4 images, 5 predicted bees (3 right): precision 3/5, recall 3/4, F1 6/9
    macro F1 = 2/3; accuracy 6/9, whose 95% Wilson interval is 0.3542 to 0.8794 (as published
    tables and calculators give it).
    """
    assert evaluate(trained, tmp_path) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report == {
        "accuracy": pytest.approx(6 / 9), "ci95_low": pytest.approx(0.3542, abs=1e-4),
        "ci95_high": pytest.approx(0.8794, abs=1e-4), "macro_f1": pytest.approx(2 / 3), "images": VAL_IMAGES,
        "best_epoch": read_meta(trained.oracle, CheckpointMeta).epoch, "loss": report["loss"],
        "split": "val", "held_out": False,  # the validation images chose the checkpoint's epoch
    }
    assert VAL_IMAGES == 9
    per_class = {row.pop("class"): {k: float(v) for k, v in row.items()} for row in read_rows(tmp_path / "classes.csv")}
    assert per_class == {
        "ants": pytest.approx({"precision": 3 / 4, "recall": 3 / 5, "f1": 2 / 3, "support": 5}),
        "bees": pytest.approx({"precision": 3 / 5, "recall": 3 / 4, "f1": 2 / 3, "support": 4}),
    }
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["device"] == "cpu" and record["images"] == 9 and record["wall_seconds"] > 0
    # Two classes: the true class's probability is the confidence when right, 1 - it when wrong.
    rows = read_rows(tmp_path / "predictions.csv")
    losses = [-math.log(float(r["confidence"]) if r["actual"] == r["predicted"] else 1 - float(r["confidence"]))
              for r in rows]
    assert report["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-3)
    assert "evaluate@finetune: accuracy 0.6667 (95% CI 0.3542-0.8794) on 9 val images" in capsys.readouterr().out
    assert leftovers(tmp_path) == []


def test_predictions_csv_has_one_row_per_validation_image(trained: Trained, tmp_path: Path) -> None:
    """path, actual, predicted, confidence, in the data set's order, paths relative to the
    data folder (so the file is the same wherever the data lives): the columns DVC's
    confusion template reads as x=actual, y=predicted."""
    assert evaluate(trained, tmp_path) == 0
    text = (tmp_path / "predictions.csv").read_text(encoding="utf-8")
    assert text.splitlines()[0] == "path,actual,predicted,confidence"
    rows = read_rows(tmp_path / "predictions.csv")
    assert [r["path"] for r in rows] == list(val_tensors(trained))
    assert len(rows) == VAL_IMAGES
    for row in rows:
        path = Path(row["path"])
        assert not path.is_absolute() and path.parts[0] == "val" and (trained.data / path).is_file()
        assert row["actual"] == path.parent.name
        assert row["predicted"] in CLASSES
        assert len(row["confidence"].split(".")[1]) == 6
        assert 0.5 <= float(row["confidence"]) <= 1, "the top probability of 2 classes is at least 1/2"
        assert (row["predicted"] != row["actual"]) == is_decoy(row["path"]), row


def test_accuracy_equals_what_training_validated(trained: Trained, tmp_path: Path) -> None:
    """The stage-trained checkpoint scores exactly the validation accuracy training recorded
    for it: evaluation uses the same deterministic transforms, eval mode and weights."""
    checkpoint = trained.checkpoint("finetune")
    assert evaluate(trained, tmp_path, model=checkpoint) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    meta = read_meta(checkpoint, CheckpointMeta)
    train_record = json.loads(trained.train_record("finetune").read_text())
    assert report["accuracy"] == pytest.approx(meta.val_acc, abs=1e-12)
    assert report["best_epoch"] == meta.epoch == train_record["epochs"] == 1
    assert report["loss"] == pytest.approx(train_record["final"]["val_loss"], rel=1e-4)


def test_a_test_split_is_what_evaluate_scores(trained: Trained, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Where the data has a test/ split, evaluate scores it (validation chose the epoch) and
    says so: ``split: test``, ``held_out: true``. Here test/ is val/ without its decoys, so the
    oracle gets all of its 6 images right, where it gets 6 of val's 9."""
    data = trained.copy_data(tmp_path / "data")
    shutil.copytree(data / "val", data / "test", ignore=shutil.ignore_patterns("decoy_*"))
    assert evaluate(trained, tmp_path, data=data) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert (report["split"], report["held_out"], report["images"], report["accuracy"]) == ("test", True, 6, 1.0)
    paths = [row["path"] for row in read_rows(tmp_path / "predictions.csv")]
    assert len(paths) == 6 and all(p.startswith("test/") and not is_decoy(p) for p in paths), paths
    assert "on 6 test images" in capsys.readouterr().out


def test_reruns_are_byte_identical(trained: Trained, tmp_path: Path) -> None:
    """Two runs write the same bytes: the grid's sample is seeded, transforms are fixed and
    PNGs carry no timestamp, so an unchanged stage does not look changed to DVC or git."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert evaluate(trained, first) == 0
    torch.manual_seed(12345)  # global random state must not matter
    assert evaluate(trained, second) == 0
    for name in OUTPUTS:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    for name in ("predictions.png", "mistakes.png"):
        assert_png(first / name)


def test_grids_show_a_seeded_sample_and_the_most_confident_mistakes(
        trained: Trained, tmp_path: Path, grids: dict[str, GridCall]) -> None:
    """predictions.png: ``evaluate.grid_images`` distinct validation images chosen by
    ``seed``, titled with predicted and true class, mistakes framed; mistakes.png: the wrong
    predictions with the highest confidence, most confident first (3 mistakes, room for 2)."""
    assert evaluate(trained, tmp_path / "seed0") == 0
    rows = {r["path"]: r for r in read_rows(tmp_path / "seed0" / "predictions.csv")}
    tensors = val_tensors(trained)

    sample = grids["predictions.png"]
    shown = which_files(sample.images, tensors)
    assert len(shown) == len(set(shown)) == GRID
    assert sample.titles == [title(rows[f]) for f in shown]
    assert sample.mistakes == [rows[f]["predicted"] != rows[f]["actual"] for f in shown]

    wrong = sorted((r for r in rows.values() if r["predicted"] != r["actual"]),
                   key=lambda r: -float(r["confidence"]))
    assert len(wrong) == 3 > GRID
    mistakes = grids["mistakes.png"]
    assert which_files(mistakes.images, tensors) == [r["path"] for r in wrong[:GRID]]
    assert mistakes.titles == [title(r) for r in wrong[:GRID]]
    assert mistakes.mistakes == [True] * GRID
    assert "(3 of 9 wrong)" in mistakes.suptitle

    other_seed = tiny_params(tmp_path / "params-seed1.yaml", {**EVAL_PARAMS, "seed": 1})
    assert evaluate(trained, tmp_path / "seed1", params=other_seed) == 0
    assert which_files(grids["predictions.png"].images, tensors) != shown, "the sample must follow `seed`"
    assert which_files(grids["mistakes.png"].images, tensors) == [r["path"] for r in wrong[:GRID]]
    pictures = [(tmp_path / seed / "predictions.png").read_bytes() for seed in ("seed0", "seed1")]
    assert pictures[0] != pictures[1]


def test_no_mistakes(trained: Trained, tmp_path: Path, grids: dict[str, GridCall]) -> None:
    """Without the decoys the oracle is always right: accuracy 1, and mistakes.png is still
    written (an empty grid saying so), because DVC expects every declared output."""
    data = trained.copy_data(tmp_path / "data")
    for decoy in data.glob("val/*/decoy_*"):
        decoy.unlink()
    assert evaluate(trained, tmp_path / "out", data=data) == 0
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["accuracy"] == 1.0 and report["images"] == 6 and report["macro_f1"] == 1.0
    assert report["ci95_high"] == 1.0 and report["ci95_low"] == pytest.approx(0.6097, abs=1e-4)
    assert grids["mistakes.png"].images == []
    assert "(0 of 6 wrong)" in grids["mistakes.png"].suptitle
    assert_png(tmp_path / "out" / "mistakes.png")


class _RunsCode:
    """Unpickling this calls ``os.mkdir(path)``: stands in for a malicious checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.mkdir, (str(self.path),)


def test_checkpoint_is_loaded_with_weights_only(trained: Trained, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint whose pickle would run code is refused with one error line and the code
    never runs (``torch.load(..., weights_only=True)``); nothing is written."""
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"fc.weight": _RunsCode(marker)}, evil)
    shutil.copy(trained.oracle.with_suffix(".json"), evil.with_suffix(".json"))
    # The file is dangerous indeed: a full unpickle runs the code.
    torch.load(evil, weights_only=False)
    assert marker.is_dir()
    marker.rmdir()

    assert evaluate(trained, tmp_path / "out", model=evil) == 1
    line = error_line(capsys.readouterr().err)
    assert f"cannot load checkpoint {evil}" in line
    assert not marker.exists(), "loading the checkpoint ran code from its pickle"
    assert not (tmp_path / "out").exists()


def test_classes_that_differ_from_the_checkpoint(trained: Trained, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Data whose classes are not the model's is refused with one line naming both lists."""
    data = trained.copy_data(tmp_path / "data")
    for split in ("train", "val"):
        shutil.copytree(data / split / "bees", data / split / "wasps")
    assert evaluate(trained, tmp_path / "out", data=data) == 1
    line = error_line(capsys.readouterr().err)
    assert "['ants', 'bees', 'wasps']" in line and "trained on ['ants', 'bees']" in line
    assert not (tmp_path / "out").exists()


def test_missing_checkpoint(trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No checkpoint: one line that says which file and how to make it."""
    assert evaluate(trained, tmp_path / "out", model=tmp_path / "nothing.pt") == 1
    line = error_line(capsys.readouterr().err)
    assert str(tmp_path / "nothing.pt") in line and "run " in line
    assert not (tmp_path / "out").exists()


def test_preview_draws_one_seeded_training_batch(trained: Trained, tmp_path: Path,
                                                 grids: dict[str, GridCall]) -> None:
    """plots/train_batch.png: the first training batch (train.batch_size augmented images,
    titled with their classes), the same picture on a rerun, another one for another seed."""
    def preview(out: Path, params: Path) -> int:
        return exit_code(preview_stage.main, ["--params", str(params), "--data", str(trained.data),
                                        "--weights", str(trained.models / "pretrained.pt"), "--out", str(out)])

    assert preview(tmp_path / "a.png", trained.params) == 0
    batch = grids["a.png"]
    assert len(batch.images) == 4  # imagefolders.TINY_TRAIN's batch size
    assert set(batch.titles) <= set(CLASSES)
    assert all(image.shape == (3, 32, 32) for image in batch.images)
    assert_png(tmp_path / "a.png")
    assert preview(tmp_path / "b.png", trained.params) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    other_seed = tiny_params(tmp_path / "params-seed1.yaml", {**EVAL_PARAMS, "seed": 1})
    assert preview(tmp_path / "c.png", other_seed) == 0
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk full", "ctrl-c"])
def test_failure_while_drawing_leaves_every_output_as_it_was(
        trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        failure: BaseException) -> None:
    """The metrics and CSVs are written before the pictures: a run that fails (out of disk) or is
    interrupted (Ctrl-C) while drawing its second picture, on data that would change every
    output, leaves all of them (the first picture too) byte-identical to the last good run, and
    its one line, which says so, is true."""
    out = tmp_path / "out"
    assert evaluate(trained, out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {*OUTPUTS, "record.json"}
    data = trained.copy_data(tmp_path / "data")
    for decoy in data.glob("val/*/decoy_*"):  # every output differs without them: accuracy 1, no mistakes
        decoy.unlink()
    real, drawn = evaluate_stage.save_image_grid, []

    def fail_on_the_second(path: Path, *args: Any, **kwargs: Any) -> None:
        if drawn:
            raise failure
        drawn.append(path)
        real(path, *args, **kwargs)

    monkeypatch.setattr(evaluate_stage, "save_image_grid", fail_on_the_second)
    capsys.readouterr()
    code = evaluate(trained, out, data=data)
    assert drawn == [out / "predictions.png"], "the failure did not come after the metrics, CSVs and a picture"
    captured = capsys.readouterr()
    assert "accuracy 1.0000" in captured.out, "the run did get to new numbers"
    if isinstance(failure, OSError):
        assert code == 1
        line = error_line(captured.err)
        assert "No space left on device" in line and line.endswith("the stage's outputs are as they were")
    else:
        assert code == 130
        assert captured.err.splitlines() == [
            "interrupted by Ctrl-C (SIGINT): nothing was written to the stage's outputs"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
