"""A tiny trained checkpoint, made once per test session and shared by the evaluate and
predict tests.

Training for real (the ``weights`` and ``train`` stages, in-process, one epoch on 32-pixel
images) is cheaper than it sounds (a few seconds) and means those tests read exactly what
the pipeline writes, not a hand-made imitation of it. Pretrained weights cannot be
downloaded in tests, so ``model.weights`` is ``none``.

A one-epoch model from random weights learns next to nothing (it may well call everything
"bees"), which leaves little for the evaluation tests to check against. So besides the
stage-trained ``finetune.pt`` there is an *oracle*: the same checkpoint with its final layer
rewritten as a nearest-centroid classifier of the training images' features. Its answers are
known in advance: every image of a class's own colour is right, and the *decoys* (images of
the other class's colour, which the validation split holds besides its own) are confident
mistakes. The file format is the pipeline's own (a plain state_dict plus its JSON sidecar).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CLASS_COLOURS, make_image
from imagefolders import load_trained, make_image_folders, tiny_params, tutorial_transform

from stages import train as train_stage
from stages import weights as weights_stage
from transfer.checkpoints import save_checkpoint
from transfer.imagefolder import image_folders
from transfer.images import decode
from transfer.stage import run_stage

CLASSES = ("ants", "bees")
N_TRAIN, N_VAL = 6, 3
#: Decoys per val/<class>/; unequal, so that precision and recall differ.
N_DECOYS = {"ants": 2, "bees": 1}
#: Validation images: each class's own images plus the decoys of the other class's colour.
VAL_IMAGES = len(CLASSES) * N_VAL + sum(N_DECOYS.values())
#: Params of every run here (on top of ``imagefolders.TINY_TRAIN``): a grid smaller than the
#: number of mistakes, and batches that do not divide the validation set.
EVAL_PARAMS: dict[str, Any] = {"runtime.inference_batch_size": 4, "evaluate.grid_images": 2}


@dataclass(frozen=True)
class Trained:
    """Where the shared run's inputs and outputs are; treat every file as read-only."""

    root: Path     # everything below lives here
    data: Path     # <data>/{train,val}/<class>/*.png
    params: Path   # the params.yaml the run used
    models: Path   # pretrained.pt/.json, finetune.pt/.json

    def checkpoint(self, mode: str = "finetune") -> Path:
        return self.models / f"{mode}.pt"

    def train_record(self, mode: str = "finetune") -> Path:
        return self.root / "reports" / mode / "train.json"

    @property
    def oracle(self) -> Path:
        """The nearest-centroid checkpoint: right on own colours, wrong on every decoy."""
        return self.models / "oracle.pt"

    def copy_data(self, dest: Path) -> Path:
        """A private copy of the image folders, for a test that adds or removes images."""
        return Path(shutil.copytree(self.data, dest))


_SHARED: dict[str, Trained] = {}


def add_decoys(data: Path) -> None:
    """Put ``N_DECOYS[class]`` images of the *other* class's colour into each val/<class>/."""
    for k, cls in enumerate(CLASSES):
        other = CLASS_COLOURS[(k + 1) % len(CLASSES)]
        for i in range(N_DECOYS[cls]):
            name = f"decoy_{cls}_{i}"
            (data / "val" / cls / f"{name}.png").write_bytes(make_image(other, 32, name))


def exit_code(main: Any, argv: list[str]) -> int:
    """Run a stage's ``main`` in-process like its command line does; return its exit code."""
    try:
        run_stage(main, argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def run_ok(main: Any, argv: list[str]) -> None:
    """Run a stage's ``main`` like its command line does; fail the test on a non-zero exit."""
    code = exit_code(main, argv)
    if code:
        pytest.fail(f"{main.__module__} {' '.join(argv)} exited {code}")


def is_decoy(relative_path: str) -> bool:
    """Whether a predictions.csv path (``val/<class>/<name>``) is a decoy image."""
    return Path(relative_path).name.startswith("decoy_")


def single_thread() -> int:
    """Use one torch thread; return the previous count to restore.

    For 32-pixel images thread hand-offs cost more than they save, and on a loaded machine
    two spinning OpenMP threads made a forward pass 50x slower. Results are the same.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    return previous


@torch.inference_mode()
def write_oracle(checkpoint: Path, data: Path, dest: Path, margin: float = 4.0) -> None:
    """Copy ``checkpoint`` to ``dest`` with a nearest-centroid head fitted on train/.

    Logit ``k`` is ``s * (f.m_k - |m_k|^2 / 2)`` for class mean features ``m_k``, so the
    largest logit is the nearest centroid; ``s`` puts a class's own centroid ``margin``
    logits ahead (about 98% confidence), not at 100%, so confidences still differ.
    """
    device = torch.device("cpu")
    model, meta = load_trained(checkpoint, device)
    head_name = meta.head
    parent_name, _, attr = head_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    head = getattr(parent, attr)
    setattr(parent, attr, torch.nn.Identity())
    train = image_folders(data)["train"]
    transform = tutorial_transform(meta.preprocess)
    features = torch.stack([model(transform(decode(path)).unsqueeze(0))[0] for path in train.paths])
    labels = torch.tensor(train.labels)
    means = torch.stack([features[labels == k].mean(dim=0) for k in range(len(train.classes))])
    spread = (means[0] - means[1]).pow(2).sum() / 2
    scale = margin / spread
    head.weight.copy_(scale * means)
    head.bias.copy_(-scale * means.pow(2).sum(dim=1) / 2)
    setattr(parent, attr, head)
    save_checkpoint(dest, model.state_dict(), meta)


def build(root: Path, modes: tuple[str, ...] = ("finetune",)) -> Trained:
    """Generate the data, then run the weights stage and the train stage for ``modes``."""
    data = make_image_folders(root / "data", classes=CLASSES, n_train=N_TRAIN, n_val=N_VAL)
    add_decoys(data)
    params = tiny_params(root / "params.yaml", EVAL_PARAMS)
    models = root / "models"
    run_ok(weights_stage.main, ["--params", str(params), "--out", str(models / "pretrained.pt")])
    for mode in modes:
        run_ok(train_stage.main, [
            "--strategy", mode, "--params", str(params), "--inputs", str(data),
            "--weights", str(models / "pretrained.pt"), "--model-out", str(models / f"{mode}.pt"),
            "--history", str(root / "plots" / mode / "history.csv"),
            "--record", str(root / "reports" / mode / "train.json"),
        ])
    write_oracle(models / "finetune.pt", data, models / "oracle.pt")
    return Trained(root=root, data=data, params=params, models=models)


def shared_trained(factory: pytest.TempPathFactory) -> Trained:
    """The session's one trained finetune checkpoint (built on first use)."""
    if "finetune" not in _SHARED:
        previous = single_thread()
        try:
            _SHARED["finetune"] = build(factory.mktemp("trained"))
        finally:
            torch.set_num_threads(previous)
    return _SHARED["finetune"]
