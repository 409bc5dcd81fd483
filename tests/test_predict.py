"""``python -m stages.predict``: classify new images with a trained checkpoint.

The oracle checkpoint of ``trained.py`` knows its answers (red images are ants, blue ones
bees), so every printed class can be checked. One run goes through a real subprocess, as a
user types it, with a missing path and a text file named .jpg among good images: each bad
input gets one ``error:`` line, the rest are still predicted, and the exit code is 1. The
other cases run in-process, which is faster and reports failures more precisely.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import CLASS_COLOURS, REPO_ROOT, bilevel_png, error_line, make_image, sideways_jpeg, stage_env
from imagefolders import tiny_params
from PIL import Image
from trained import EVAL_PARAMS, Trained, exit_code, is_decoy, single_thread

from stages import evaluate as evaluate_stage
from stages import predict as predict_stage

ANTS_FOLDER = ["ants_val_0.png", "ants_val_1.png", "ants_val_2.png", "decoy_ants_0.png", "decoy_ants_1.png"]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread (see ``trained.single_thread``)."""
    previous = single_thread()
    yield
    torch.set_num_threads(previous)


def expected_class(path: Path) -> str:
    """What the oracle answers: the folder's class, except for decoys (the other colour)."""
    own = path.parent.name
    if not is_decoy(path.name):
        return own
    return "bees" if own == "ants" else "ants"


def fake_jpeg(folder: Path) -> Path:
    """A text file with an image's name: passes the name check, fails to decode."""
    path = folder / "notes.jpg"
    path.write_text("not an image, just text\n", encoding="utf-8")
    return path


def predict(trained: Trained, *args: str | Path) -> int:
    """``stages.predict`` in-process with the oracle and the tiny params; return the exit code."""
    return exit_code(predict_stage.main, ["--model", str(trained.oracle), "--params", str(trained.params),
                                          *map(str, args)])


def error_lines(stderr: str) -> list[str]:
    """All stderr lines, which must each be an ``error:`` line (no traceback, no noise)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert all(line.startswith("error: ") for line in lines), stderr
    return lines


def test_command_line_reports_bad_inputs_and_predicts_the_rest(trained: Trained, tmp_path: Path) -> None:
    """A real subprocess with --json: a folder, a missing path, a text file named .jpg and a
    file. Two error lines, every image predicted in argument order, valid JSON, exit code 1."""
    missing = tmp_path / "no-such-image.png"
    fake = fake_jpeg(tmp_path)
    single = trained.data / "val" / "bees" / "bees_val_0.png"
    env = {**stage_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "stages.predict", "--strategy", "finetune", "--json", "--device", "cpu",
         "--model", str(trained.oracle), "--params", str(trained.params),
         str(trained.data / "val" / "ants"), str(missing), str(fake), str(single)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 1, proc.stderr
    errors = error_lines(proc.stderr)
    assert len(errors) == 2, proc.stderr
    assert str(missing) in errors[0] and "no such file" in errors[0]
    assert str(fake) in errors[1] and "not a readable image" in errors[1]

    results = json.loads(proc.stdout)
    paths = [Path(r["path"]) for r in results]
    assert paths == [trained.data / "val" / "ants" / name for name in ANTS_FOLDER] + [single]
    for result, path in zip(results, paths, strict=True):
        assert result["class"] == expected_class(path), result
        probabilities = result["probabilities"]
        assert list(probabilities) == ["ants", "bees"]
        assert sum(probabilities.values()) == pytest.approx(1, abs=1e-5)
        assert result["confidence"] == max(probabilities.values()) == probabilities[result["class"]]


def test_text_output_and_exit_code_zero(trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """All good inputs: one ``path<TAB>class<TAB>confidence`` line each, nothing on stderr,
    exit code 0; and the confidence is the one evaluation computed for the same file, since
    both preprocess exactly as validation does."""
    assert exit_code(evaluate_stage.main, [
        "--strategy", "finetune", "--params", str(trained.params), "--data", str(trained.data),
        "--model", str(trained.oracle), "--metrics", str(tmp_path / "metrics.json"), "--plots", str(tmp_path),
        "--record", str(tmp_path / "record.json")]) == 0
    evaluated = {line.split(",")[0]: line.split(",") for line in
                 (tmp_path / "predictions.csv").read_text().splitlines()[1:]}
    capsys.readouterr()

    folder = trained.data / "val"
    assert predict(trained, "--device", "cpu", folder) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert len(lines) == len(evaluated)
    for line in lines:
        path, cls, confidence = line.split("\t")
        relative = Path(path).relative_to(trained.data).as_posix()
        _, _, predicted, eval_confidence = evaluated[relative]
        assert cls == predicted == expected_class(Path(path))
        assert len(confidence.split(".")[1]) == 4
        assert float(confidence) == pytest.approx(float(eval_confidence), abs=6e-5)


def test_only_bad_inputs(trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing path alone: its error line, no output, exit code 1 (in JSON mode: [])."""
    assert predict(trained, tmp_path / "missing.jpg") == 1
    captured = capsys.readouterr()
    assert error_lines(captured.err) == [f"error: {tmp_path / 'missing.jpg'}: no such file or folder"]
    assert captured.out == ""
    assert predict(trained, "--json", fake_jpeg(tmp_path)) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out) == []
    assert "not a readable image" in error_line(captured.err)


def test_folders_are_searched_recursively_without_litter(trained: Trained, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A folder yields its images at any depth, sorted; hidden folders (notebook
    checkpoints), .DS_Store and non-image names are skipped; an empty folder is an error."""
    folder = tmp_path / "new"
    (folder / "deep" / "er").mkdir(parents=True)
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / "a.png").write_bytes(make_image(CLASS_COLOURS[0], 32, "a"))
    (folder / "deep" / "er" / "b.jpg").write_bytes(make_image(CLASS_COLOURS[1], 32, "b", "JPEG"))
    (folder / ".ipynb_checkpoints" / "c.png").write_bytes(make_image(CLASS_COLOURS[0], 32, "c"))
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "readme.txt").write_text("hello", encoding="utf-8")
    empty = tmp_path / "empty"
    empty.mkdir()

    assert predict(trained, folder, empty) == 1
    captured = capsys.readouterr()
    assert error_lines(captured.err) == [f"error: {empty}: folder holds no images"]
    predicted = [line.split("\t")[:2] for line in captured.out.splitlines()]
    assert predicted == [[str(folder / "a.png"), "ants"], [str(folder / "deep" / "er" / "b.jpg"), "bees"]]


def test_default_model_and_device_override(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Without --model, ``models/<mode>.pt`` is used; --device overrides the device param
    (here one this machine cannot have), and without it that param is obeyed."""
    models = tmp_path / "models"
    models.mkdir()
    for suffix in (".pt", ".json"):
        shutil.copy(trained.oracle.with_suffix(suffix), models / f"feature_extract{suffix}")
    tiny_params(tmp_path / "params.yaml", {**EVAL_PARAMS, "device": "cuda:99"})
    image = trained.data / "val" / "bees" / "bees_val_1.png"
    monkeypatch.chdir(tmp_path)

    assert exit_code(predict_stage.main, ["--strategy", "feature_extract", "--device", "cpu", str(image)]) == 0
    assert capsys.readouterr().out.split("\t")[:2] == [str(image), "bees"]

    assert exit_code(predict_stage.main, ["--strategy", "feature_extract", str(image)]) == 1
    assert "cuda:99" in error_line(capsys.readouterr().err)

    assert exit_code(predict_stage.main, ["--strategy", "finetune", "--device", "cpu", str(image)]) == 1
    captured = capsys.readouterr()
    assert "finetune" in error_line(captured.err) and captured.out == ""
    assert sorted(os.listdir(models)) == ["feature_extract.json", "feature_extract.pt"], "predict writes nothing"


def test_phone_photo_is_predicted_upright(trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A JPEG stored sideways whose EXIF says "rotate 90" (ants' colour on the left, bees' on
    the right) is predicted exactly like its pixels turned upright and stored losslessly,
    and not like the sideways pixels: predict sees what a viewer shows."""
    phone = sideways_jpeg(tmp_path / "phone.jpg", CLASS_COLOURS[0], CLASS_COLOURS[1])
    with Image.open(phone) as raw:
        sideways = raw.convert("RGB")  # the stored pixels, as a loader that ignores EXIF sees them
    sideways.save(tmp_path / "sideways.png")
    sideways.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")

    assert predict(trained, "--json", "--device", "cpu", phone, tmp_path / "upright.png",
                   tmp_path / "sideways.png") == 0
    phone_result, upright, sideways_result = json.loads(capsys.readouterr().out)
    assert phone_result["probabilities"] == upright["probabilities"]
    assert phone_result["probabilities"] != sideways_result["probabilities"]


def test_image_past_the_pixel_limit_is_an_error_line(trained: Trained, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A 10,000 x 10,000 PNG (past Pillow's decompression-bomb limit) gets one error line
    with its pixel count, as unzip reports it, and is not decoded; the other image is still
    predicted and the exit code is 1."""
    folder = tmp_path / "new"
    folder.mkdir()
    (folder / "a.png").write_bytes(make_image(CLASS_COLOURS[0], 32, "a"))
    (folder / "huge.png").write_bytes(bilevel_png(10_000, 10_000))
    assert predict(trained, "--device", "cpu", folder) == 1
    captured = capsys.readouterr()
    assert error_lines(captured.err) == [
        f"error: {folder / 'huge.png'}: too large to decode safely: 100,000,000 pixels, over the 89,478,485 "
        "pixels of Pillow's decompression-bomb check (downscale it if it is a genuine image)"]
    assert [line.split("\t")[:2] for line in captured.out.splitlines()] == [[str(folder / "a.png"), "ants"]]
