"""Tiny on-disk inputs for the training tests: image folders, params files, weight files.

The train stage reads an already-extracted ``<root>/{train,val}/<class>/<image>`` tree, so
these helpers write one directly (no zip, no unzip stage) from the same coloured images as
``conftest.make_dataset_zip``: one clearly different colour per class, so even one epoch of
a small model can tell the classes apart. Pretrained weights cannot be downloaded in tests,
so weight files are random-initialised state_dicts saved to disk.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from conftest import CLASS_COLOURS, make_image, write_params
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from transfer.checkpoints import CheckpointMeta, read_meta, trained_classifier
from transfer.datasets import EpochSampler
from transfer.distributed import World
from transfer.preprocess import INTERPOLATIONS, Preprocess
from transfer.training import make_loader

#: The backbone of the tests' training runs: ShuffleNetV2 x0.5 has a ResNet's ``fc`` head and
#: BatchNorm, at an eighth of resnet18's size, so that each epoch's resume state and each
#: checkpoint are a few MB to write and hash, not 45-135 MB (that took most of a tiny run's time).
#: resnet18, the default, is tested where its own names matter (tests/test_models.py,
#: tests/test_weights_stage.py).
TINY_ARCH = "shufflenet_v2_x0_5"
#: The params that make one training run take about a second on two CPU cores.
TINY_TRAIN: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "model.arch": TINY_ARCH,
    "model.weights": "none",
    "runtime.download_retries": 0,
    "runtime.download_timeout": 5,
    "preprocess.resize": 40,
    "preprocess.crop": 32,
    "train.batch_size": 4,
    "runtime.num_workers": 0,
    "runtime.threads": 1,
    "train.amp": False,
    "train.deterministic": False,
    "train.finetune.epochs": 1,
    "train.feature_extract.epochs": 1,
    "train.lp_ft.epochs": 1,
    "train.feature_extract.batchnorm": "frozen",
}


def make_image_folders(
    root: str | os.PathLike[str],
    classes: Iterable[str] = ("ants", "bees"),
    n_train: int = 6,
    n_val: int = 4,
    size: int = 32,
) -> Path:
    """Write ``root/{train,val}/<class>/<class>_<split>_<i>.png`` and return ``root``.

    Class ``k`` gets colour ``CLASS_COLOURS[k]`` with light per-pixel noise; the same
    arguments always give the same bytes, so runs on these folders are comparable.
    """
    root = Path(root)
    for split, count in (("train", n_train), ("val", n_val)):
        for k, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            colour = CLASS_COLOURS[k % len(CLASS_COLOURS)]
            for i in range(count):
                name = f"{cls}_{split}_{i}"
                (folder / f"{name}.png").write_bytes(make_image(colour, size, name))
    return root


def tiny_params(dest: str | os.PathLike[str], changes: Mapping[str, Any] | None = None) -> Path:
    """The repository's params.yaml with :data:`TINY_TRAIN` and then ``changes`` applied."""
    return write_params(dest, {**TINY_TRAIN, **(changes or {})})


def random_state_dict(arch: str = TINY_ARCH, seed: int = 1234, calibrated: bool = False) -> dict[str, torch.Tensor]:
    """A randomly initialised torchvision model's state_dict (stands in for pretrained weights).

    The BatchNorm running statistics are randomised too (not torch's 0/1 defaults), so a test
    can tell "loaded from the file" apart from "freshly initialised". ``calibrated``: they are
    those of random images instead, as training would leave them, so that the network's outputs
    depend on its input (a deep random network with other statistics gives every image the
    same features, and nothing can learn from them).
    """
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.9, 1.1)
                module.momentum = None if calibrated else module.momentum  # a cumulative average
        if calibrated:
            model.train()(torch.randn(32, 3, 32, 32))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> Path:
    """Save ``state`` as ``.safetensors`` or, for any other suffix, with ``torch.save``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(dict(state), path)
    return path


def features_argv(params: Path, data: Path, weights: Path, out: Path) -> list[str]:
    """The features stage's command line, writing ``out/features/`` and its run record."""
    return ["--params", str(params), "--data", str(data), "--weights", str(weights),
            "--out", str(out / "features"), "--record", str(out / "features.json")]


def train_argv(strategy: str, params: Path, inputs: Path, start: Path, out: Path) -> list[str]:
    """The train stage's command line, with every output under ``out/`` (``<strategy>.pt`` ...).
    ``inputs``: the image folders, or the features folder; ``start``: the weights stage's file,
    or the checkpoint of the strategy this one starts from."""
    return [
        "--strategy", strategy, "--params", str(params), "--inputs", str(inputs), "--weights", str(start),
        "--model-out", str(out / f"{strategy}.pt"), "--history", str(out / strategy / "history.csv"),
        "--record", str(out / strategy / "train.json"),
    ]


def run_training(strategy: str, params: Path, data: Path, weights: Path, out: Path) -> Path:
    """``train@<strategy>`` on ``data`` with outputs under ``out/``, after what it needs, as
    ``dvc repro`` runs them: the features stage, or the strategy it starts from; return ``out``."""
    import stages.features
    import stages.train
    from transfer.strategies import STRATEGIES

    record = STRATEGIES[strategy]
    inputs, start = data, weights
    if record.inputs == "features":
        stages.features.main(features_argv(params, data, weights, out))
        inputs = out / "features"
    if record.start is not None:
        start = run_training(record.start, params, data, weights, out) / f"{record.start}.pt"
    stages.train.main(train_argv(strategy, params, inputs, start, out))
    return out


#: What a run record says of the results (the rest is timings and the machine).
RESULTS = ("best_epoch", "best_val_acc", "epochs", "final")


def checkpoint(out: Path, mode: str) -> dict[str, torch.Tensor]:
    """The state_dict ``run_training`` wrote under ``out``."""
    return torch.load(out / f"{mode}.pt", map_location="cpu", weights_only=True)


def run_outputs(out: Path, mode: str) -> tuple[list[dict[str, str]], dict[str, Any], dict[str, torch.Tensor]]:
    """History rows, the run record's results (not its timings or machine), and the checkpoint."""
    with (out / mode / "history.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    record = json.loads((out / mode / "train.json").read_text())
    return rows, {k: record[k] for k in RESULTS}, checkpoint(out, mode)


def assert_same_run(a: Path, b: Path, mode: str) -> None:
    """The two runs under ``a`` and ``b`` wrote the same history, results, sidecar and checkpoint bytes."""
    rows_a, results_a, state_a = run_outputs(a, mode)
    rows_b, results_b, state_b = run_outputs(b, mode)
    assert rows_a == rows_b
    assert results_a == results_b
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert read_meta(a / f"{mode}.pt", CheckpointMeta) == read_meta(b / f"{mode}.pt", CheckpointMeta)
    assert (a / f"{mode}.pt").read_bytes() == (b / f"{mode}.pt").read_bytes(), "same tensors, other bytes"


def assert_close_run(a: Path, b: Path, mode: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """As :func:`assert_same_run`, to float rounding: for runs whose sums add up in another
    order (several processes), so the same epochs, best epoch and numbers, not the same bits."""
    assert_close_outputs(run_outputs(a, mode), run_outputs(b, mode), rtol, atol)
    assert read_meta(a / f"{mode}.pt", CheckpointMeta).classes == read_meta(b / f"{mode}.pt", CheckpointMeta).classes


def assert_close_outputs(a: tuple[list[dict[str, str]], dict[str, Any], dict[str, torch.Tensor]],
                         b: tuple[list[dict[str, str]], dict[str, Any], dict[str, torch.Tensor]],
                         rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Two runs' history rows, run records and checkpoints (:func:`run_outputs`) to float rounding."""
    (rows_a, record_a, state_a), (rows_b, record_b, state_b) = a, b
    assert (record_a["epochs"], record_a["best_epoch"]) == (record_b["epochs"], record_b["best_epoch"])
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        assert {k: float(v) for k, v in row_b.items()} == pytest.approx(
            {k: float(v) for k, v in row_a.items()}, rel=rtol, abs=atol)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=rtol, atol=atol)


class Tensors(Dataset[tuple[torch.Tensor, int]]):
    """``(view, index)`` -> ``inputs[index]`` and its label (every view alike): a data set in
    the shape the pipeline's loaders take."""

    def __init__(self, inputs: torch.Tensor, labels: list[int]) -> None:
        self.inputs, self.labels = inputs, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        return self.inputs[key[1]], self.labels[key[1]]


def loader(dataset: Dataset[tuple[torch.Tensor, int]], batch_size: int, shuffle: bool = False, seed: int = 0,
           world: World | None = None) -> DataLoader:
    """The training loop's loader over ``dataset`` in the loader process, on the CPU."""
    sampler = EpochSampler(len(dataset), seed=seed, shuffle=shuffle, cycle=1)  # type: ignore[arg-type]
    return make_loader(dataset, sampler, batch_size=batch_size, workers=0, device=torch.device("cpu"), world=world)


def tutorial_transform(pre: Preprocess) -> transforms.Compose:
    """The tutorial's validation transform on one PIL image: the reference the stages' uint8
    path (crop, then :class:`transfer.preprocess.ModelInput`) is held to."""
    return transforms.Compose([
        transforms.Resize(pre.resize, interpolation=INTERPOLATIONS[pre.interpolation]),
        transforms.CenterCrop(pre.crop),
        transforms.ToTensor(),
        transforms.Normalize(pre.mean, pre.std),
    ])


def load_trained(path: Path, device: torch.device | None = None) -> tuple[torch.nn.Module, CheckpointMeta]:
    """The classifier a checkpoint holds, with its sidecar, as evaluate loads it."""
    meta = read_meta(path, CheckpointMeta)
    return trained_classifier(path, meta, device or torch.device("cpu")), meta


def preprocess(resize: int, crop: int, interpolation: str, mean: list[float], std: list[float]) -> Preprocess:
    return Preprocess(resize=resize, crop=crop, interpolation=interpolation, mean=mean, std=std)  # type: ignore[arg-type]
