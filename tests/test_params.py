"""params.yaml is the single source of every knob: it must load, reproduce the tutorial's
recipe, and reject each kind of mistake with one line naming the key."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from conftest import DELETE, REPO_ROOT, write_params

from transfer.errors import UserError
from transfer.params import Params, load_params

TUTORIAL_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"


def load_error(path: Path) -> str:
    """The message of the UserError that loading ``path`` must raise."""
    with pytest.raises(UserError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message, "stages print the message on one line"
    return message


def test_committed_params_load() -> None:
    """The committed file passes its own schema (otherwise every stage fails at start-up)."""
    params = load_params(REPO_ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.runtime.download_retries >= 0 and params.runtime.download_timeout > 0


def effective_preprocess(p: Params) -> dict[str, Any]:
    """The preprocessing training will use: the params' values, with any ``auto`` resolved
    from the pretrained weights' metadata the way the train stage does it."""
    values = p.preprocess.model_dump()
    if "auto" not in values.values():
        return values
    from transfer.models import create_backbone, pretrained_preprocess
    from transfer.preprocess import resolve_preprocess

    meta = pretrained_preprocess(p.model.arch, p.model.weights, create_backbone(p.model.arch))
    return resolve_preprocess(p.preprocess, meta, "params.yaml").model_dump()


def test_committed_params_reproduce_the_tutorial() -> None:
    """The defaults are the PyTorch transfer-learning tutorial's recipe, data source included."""
    p = load_params(REPO_ROOT / "params.yaml")
    assert p.data.url == TUTORIAL_URL
    assert (p.model.arch, p.model.weights) == ("resnet18", "IMAGENET1K_V1")
    pre = effective_preprocess(p)
    assert (pre["resize"], pre["crop"], pre["interpolation"]) == (256, 224, "bilinear")
    assert pre["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert pre["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert p.train.batch_size == 4
    for mode in (p.train.finetune, p.train.feature_extract):
        assert mode.epochs == 25
        assert mode.lr == pytest.approx(0.001)
        assert mode.momentum == pytest.approx(0.9)
        assert mode.step_size == 7
        assert mode.gamma == pytest.approx(0.1)
    finetune = p.train.finetune
    assert (finetune.backbone_lr_scale, finetune.freeze_epochs) == (1, 0)  # one lr for all, no warm-up
    assert p.data.test_fraction == 0 and p.data.val_fraction == 0  # the data set's own split
    assert p.data.train_per_class == "all"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        pytest.param({"data.mirror": "x"}, ["unknown key data.mirror", "known keys in data: url"], id="unknown-nested"),
        pytest.param({"epochs": 3}, ["unknown key epochs"], id="unknown-top"),
        pytest.param({"train.finetune.lr": DELETE}, ["missing key train.finetune.lr"], id="missing"),
        pytest.param({"data": DELETE}, ["missing key data"], id="missing-section"),
        pytest.param({"train.batch_size": "four"}, ["train.batch_size: Input should be a valid integer, got 'four'"],
                     id="wrong-type"),
        pytest.param({"train.batch_size": True}, ["train.batch_size", "integer", "True"], id="bool-not-int"),
        pytest.param({"train.batch_size": 2.5}, ["train.batch_size", "integer", "2.5"], id="float-not-int"),
        pytest.param({"train.amp": "yes"}, ["train.amp: Input should be a valid boolean, got 'yes'"], id="wrong-bool"),
        pytest.param({"data": "x"}, ["data must be a mapping"], id="section-not-mapping"),
        pytest.param({"train.finetune.lr": 0}, ["train.finetune.lr", "greater than 0", "got 0"],
                     id="out-of-range-exclusive"),
        pytest.param({"runtime.download_retries": -1}, ["runtime.download_retries", "greater than or equal to 0",
                                                        "got -1"], id="out-of-range"),
        pytest.param({"runtime.download_timeout": -5}, ["runtime.download_timeout", "greater than 0"],
                     id="negative-timeout"),
        pytest.param({"runtime.max_unpacked_mb": 0}, ["runtime.max_unpacked_mb", "greater than 0", "got 0"],
                     id="no-unpack-cap"),
        pytest.param({"runtime.max_unpacked_mb": 1.5}, ["runtime.max_unpacked_mb", "integer"], id="fractional-cap"),
        pytest.param({"runtime.num_workers": "many"}, ["runtime.num_workers", "a valid integer or 'auto'", "'many'"],
                     id="int-or-auto"),
        pytest.param({"preprocess.interpolation": "lanczos"},
                     ["preprocess.interpolation", "'bilinear'", "'lanczos'"], id="not-a-choice"),
        pytest.param({"preprocess.mean": [0.5, 0.5]}, ["preprocess.mean", "at least 3 items"], id="wrong-length"),
        pytest.param({"preprocess.std": [0.2, 0.2, 0]}, ["preprocess.std", "greater than 0"],
                     id="list-item-out-of-range"),
        pytest.param({"model.arch": ""}, ["model.arch", "at least 1 character"], id="empty-string"),
        pytest.param({"data.url": None}, ["data.url", "valid string", "None"], id="null-url"),
        pytest.param({"data.url": "data/a\0b.zip"}, ["data.url must not contain a NUL byte"], id="nul-in-path"),
        pytest.param({"model.weights": "w\0.pt"}, ["model.weights must not contain a NUL byte"], id="nul-in-weights"),
        pytest.param({"data.sha256": "abc123"}, ["data.sha256", "[0-9a-fA-F]{64}", "'abc123'"],
                     id="sha256-too-short"),
        pytest.param({"data.sha256": "g" * 64}, ["data.sha256", "[0-9a-fA-F]{64}"], id="sha256-not-hex"),
        pytest.param({"data.train_per_class": 0}, ["data.train_per_class", "greater than 0 or 'all'"],
                     id="no-images-per-class"),
        # Numbers YAML takes that the libraries do not: numpy's seeds are 32-bit, torch's counts C ints.
        pytest.param({"seed": 2**32}, ["seed", "less than or equal to 4294967295", "got 4294967296"],
                     id="seed-beyond-numpy"),
        pytest.param({"runtime.threads": 2**40}, ["runtime.threads", "less than or equal to 1024"],
                     id="threads-beyond-openmp"),
        pytest.param({"train.batch_size": 2**31}, ["train.batch_size", "less than or equal to 2147483647"],
                     id="count-beyond-c-int"),
        pytest.param({"runtime.download_timeout": 1e12},
                     ["runtime.download_timeout", "less than or equal to 1000000000"], id="timeout-beyond-sockets"),
        # Sizes that cannot be held in memory: a 50,000-pixel side is 7.5 GB per image.
        pytest.param({"preprocess.resize": 50000}, ["preprocess.resize", "less than or equal to 4096", "50000"],
                     id="resize-beyond-memory"),
        # Not a number at all: every float must be finite.
        pytest.param({"train.finetune.lr": float("inf")}, ["train.finetune.lr", "finite number", "inf"],
                     id="infinite-lr"),
        pytest.param({"train.lp_ft.gamma": float("nan")}, ["train.lp_ft.gamma", "finite", "nan"], id="nan-gamma"),
        pytest.param({"preprocess.mean": [0.5, float("nan"), 0.5]}, ["preprocess.mean", "finite"], id="nan-mean"),
        pytest.param({"preprocess.std": [1, 1, float("inf")]}, ["preprocess.std", "finite"], id="infinite-std"),
        # Params that only make sense together.
        pytest.param({"train.finetune.freeze_epochs": 25}, ["train.finetune.freeze_epochs", "less than epochs (25)"],
                     id="warm-up-to-the-end"),
        pytest.param({"train.lp_ft.backbone_lr_scale": 2}, ["train.lp_ft.backbone_lr_scale", "less than or equal to 1"],
                     id="lr-scale-over-one"),
        pytest.param({"train.feature_extract.batchnorm": "update", "train.feature_extract.views": 2},
                     ["train.feature_extract.views must be auto with batchnorm: update"], id="views-with-update"),
        pytest.param({"train.lp_ft": DELETE}, ["missing key train.lp_ft"], id="a-strategy-missing"),
        pytest.param({"train.lp_ft.views": 2}, ["unknown key train.lp_ft.views"], id="another-strategy's-key"),
    ],
)
def test_bad_params_name_the_key(tmp_path: Path, changes: dict[str, Any], expected: list[str]) -> None:
    """Each mistake fails at start-up with a message naming the key and what was wrong."""
    path = write_params(tmp_path / "params.yaml", changes)
    message = load_error(path)
    assert message.startswith(f"{path}: ")
    for part in expected:
        assert part in message


def test_invalid_yaml_names_file_and_position(tmp_path: Path) -> None:
    """A YAML syntax error says which file and where, on one line."""
    path = tmp_path / "params.yaml"
    path.write_text("seed: [1, 2\ndevice: cpu\n", encoding="utf-8")
    message = load_error(path)
    assert str(path) in message and "not valid YAML" in message and "line" in message


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    """An empty params.yaml is a mistake, not 'all defaults' (there are no code defaults)."""
    path = tmp_path / "params.yaml"
    path.write_text("# nothing\n", encoding="utf-8")
    assert "top level must be a mapping" in load_error(path)


def test_missing_file_says_where_to_run(tmp_path: Path) -> None:
    """Running a stage from the wrong folder gives a hint instead of a traceback."""
    message = load_error(tmp_path / "params.yaml")
    assert "not found" in message and "root" in message


@pytest.mark.parametrize("digest", ["a" * 64, "0123456789ABCDEF" * 4])
def test_valid_sha256_pins_are_accepted(tmp_path: Path, digest: str) -> None:
    """Both lower- and upper-case hex digests are valid pins."""
    params = load_params(write_params(tmp_path / "params.yaml", {"data.sha256": digest}))
    assert params.data.sha256 == digest


def test_numbers_are_normalised(tmp_path: Path) -> None:
    """An integer where a float is expected is accepted and stored as a float; so is a float
    written without a dot (``1e-3``), a number in YAML 1.2 and to DVC, a string to PyYAML."""
    params = load_params(write_params(tmp_path / "params.yaml", {"runtime.download_timeout": 5}))
    assert params.runtime.download_timeout == 5.0 and isinstance(params.runtime.download_timeout, float)
    path = write_params(tmp_path / "typed.yaml")
    path.write_text(path.read_text().replace("lr: 0.001", "lr: 1e-3", 1), encoding="utf-8")
    assert load_params(path).train.finetune.lr == 0.001
    path.write_text(path.read_text().replace("lr: 1e-3", "lr: 1e-3x", 1), encoding="utf-8")
    assert "train.finetune.lr: Input should be a valid number, got '1e-3x'" in load_error(path)


def test_a_key_given_twice_is_refused(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys, silently; DVC refuses such a file, and so do
    the stages, naming the key and where it is given again."""
    path = write_params(tmp_path / "params.yaml")
    path.write_text(path.read_text().replace("seed: 42", "seed: 42\nseed: 7", 1), encoding="utf-8")
    message = load_error(path)
    assert "key 'seed' is given twice" in message and "line 2" in message, message


@pytest.mark.parametrize("text", [
    pytest.param("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, n in zip("abcdefgh", "bcdefghi", strict=True)) + "seed: 1\n", id="billion-laughs"),
    pytest.param("a: &a [*a]\nseed: 1\n", id="recursive-alias"),
    pytest.param("seed: &a [*a]\n", id="recursive-alias-in-a-key"),
])
def test_params_that_expand_are_refused_quickly(tmp_path: Path, text: str) -> None:
    """A few lines whose aliases stand for a billion values (or never end): PyYAML shares the
    aliased nodes, and validation stops at the first wrong key, never walking or printing them."""
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    started = time.perf_counter()
    message = load_error(path)
    assert time.perf_counter() - started < 5 and len(message) < 400, message
    assert message.startswith(f"{path}: ") and ("missing key" in message or "seed: Input should be" in message)


def test_params_too_large_or_too_deep_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("seed: 1\n" + "#" * (1 << 20), encoding="utf-8")
    assert load_error(big) == f"{big} is larger than 1 MiB, which no params file needs; refused"
    deep = tmp_path / "deep.yaml"
    deep.write_text("seed: " + "[" * 50_000 + "]" * 50_000 + "\n", encoding="utf-8")
    assert load_error(deep) == f"{deep} nests deeper than a params file can; refused"


def test_digest_covers_the_selected_params_only(tmp_path: Path) -> None:
    """The params digest recorded beside outputs changes with a value of the keys a stage
    declares, and not with any other param (a change there does not make it another run)."""
    keys = ("seed", "train.finetune")
    base = load_params(write_params(tmp_path / "a.yaml"))
    same = load_params(write_params(tmp_path / "b.yaml", {"train.feature_extract.lr": 0.5, "runtime.threads": 1}))
    other = load_params(write_params(tmp_path / "c.yaml", {"train.finetune.gamma": 0.5}))
    assert base.digest(keys) == same.digest(keys)
    assert base.digest(keys) != other.digest(keys)
