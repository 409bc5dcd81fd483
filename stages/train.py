"""Stage ``train@<mode>``: transfer-learn the backbone, one of two ways.

- ``finetune``: start from the pretrained weights, replace the final layer with one sized to
  the number of classes, and train every parameter on the images (``--inputs``: the image
  folders), with a fresh seeded random crop and flip of every image each epoch.
- ``feature_extract``: freeze the backbone ("ConvNet as fixed feature extractor") and train
  only the new final layer, on the backbone's outputs that the features stage computed once
  (``--inputs``: its folder); see :mod:`transfer.features`.

Writes the best epoch's weights (``models/<mode>.pt`` + ``.json``), the history
(``plots/<mode>/history.csv``, rewritten after every epoch so that ``dvc plots`` and editor
integrations show a run as it goes) and a run record (``reports/<mode>/train.json``:
summary, timings, versions, device).

After every epoch it also saves the whole state of the run beside the checkpoint
(``models/.resume/<mode>-<key>.pt``, see :mod:`transfer.resume`), so that a run stopped by
Ctrl-C, SIGTERM, SIGHUP or even SIGKILL continues from its last finished epoch when started again with
the same inputs and params, and ends with the same results as if it had never stopped.

With ``train.distributed`` asking for several processes, the stage starts itself again under
torchrun, once per process, and waits; each of those trains on its share of every step and
process 0 writes the outputs (see :mod:`transfer.distributed`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn, optim
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader

from transfer import distributed
from transfer.atomic import write_json, write_text
from transfer.checkpoints import pretrained_classifier, read_pretrained_meta, save_checkpoint, sidecar_path
from transfer.data import EpochSampler, FeatureViews, TrainImages, ValImages, image_folders, make_loader
from transfer.devices import describe_device, resolve_device
from transfer.distributed import World
from transfer.errors import run_stage
from transfer.features import PARAMS as FEATURE_PARAMS
from transfer.features import TRAIN, VAL, StoredFeatures, read_features
from transfer.interrupts import Interrupted, deferred_interrupts
from transfer.models import freeze_backbone
from transfer.params import MODES, Params, load_params
from transfer.preprocess import ModelInput, Preprocess, resolve_preprocess
from transfer.reproducibility import check_deterministic, configure_backends, seed_everything
from transfer.resume import FOLDER as RESUME_FOLDER
from transfer.resume import ResumeState, Training, restore, rng_states, run_key
from transfer.runtime import amp_warning, configure_threads, resolve_workers, run_record
from transfer.training import EpochRecord, Progress, train_model

#: How many processes train, and how they talk: with several, each computes on its share of
#: a batch and the sums differ in their last bits (BatchNorm statistics, more than that).
#: ``rdzv_endpoint`` only says where they meet.
DISTRIBUTED = ("train.distributed.nproc_per_node", "train.distributed.nnodes", "train.distributed.backend")


def tracked_params(mode: str) -> tuple[str, ...]:
    """The params this stage reads that can change its outputs, as dvc.yaml declares them."""
    return ("seed", "device", "model", "preprocess", "train.batch_size", "train.amp",
            "train.deterministic", f"train.{mode}", *DISTRIBUTED)


@dataclass
class Inputs:
    """What one mode trains on: its loaders, how a batch becomes the model's input, and
    for feature_extract the stored features (whose BatchNorm statistics it may need)."""

    classes: list[str]
    loaders: dict[str, DataLoader]
    prepare: Callable[[torch.Tensor], torch.Tensor] | None
    features: StoredFeatures | None = None


def image_inputs(folder: Path, pre: Preprocess, params: Params, device: torch.device, workers: int,
                 world: World) -> Inputs:
    """Images, decoded once and cached; a fresh augmented view of each per epoch."""
    split = image_folders(folder)
    budget = params.runtime.image_cache_mb * 2**20
    val = ValImages(split["val"], pre, cache_bytes=budget)  # small crops first, then whole images
    val.images.fill("decode val")
    train = TrainImages(split["train"], pre, seed=params.seed, cache_bytes=budget - val.images.used)
    train.images.fill("decode train")
    loaders = {
        "train": make_loader(train, EpochSampler(len(train), seed=params.seed, shuffle=True, cycle=None),
                             batch_size=params.train.batch_size, workers=workers, device=device, world=world),
        "val": make_loader(val, EpochSampler(len(val), seed=params.seed, shuffle=False, cycle=1),
                           batch_size=params.runtime.inference_batch_size * world.size, workers=workers,
                           device=device, world=world),
    }
    return Inputs(split["train"].classes, loaders, ModelInput(pre, device))


def feature_inputs(folder: Path, params: Params, device: torch.device, world: World) -> Inputs:
    """The frozen backbone's stored outputs: view ``(e - 1) % views`` of each image in epoch ``e``."""
    features = read_features(folder, params.digest(FEATURE_PARAMS))
    train = FeatureViews(features.array(TRAIN), features.labels("train"))
    val = FeatureViews(features.array(VAL), features.labels("val"))
    loaders = {
        "train": make_loader(train, EpochSampler(len(train), seed=params.seed, shuffle=True,
                                                 cycle=train.features.shape[0]),
                             batch_size=params.train.batch_size, workers=0, device=device, world=world),
        "val": make_loader(val, EpochSampler(len(val), seed=params.seed, shuffle=False, cycle=val.features.shape[0]),
                           batch_size=params.runtime.inference_batch_size * world.size, workers=0, device=device,
                           world=world),
    }
    return Inputs(features.meta["classes"], loaders, None, features)


def history_csv(history: list[EpochRecord]) -> str:
    return pd.DataFrame([r.as_row() for r in history]).round(6).to_csv(index=False, lineterminator="\n")


def saved_state(state: ResumeState, mode: str) -> dict[str, Any] | None:
    """The saved state of this run's interrupted predecessor, or None to start at epoch 1.

    States of runs with other inputs, params or code are never used; saying so spares a user
    who expected a resume from wondering why training starts over.
    """
    for other in state.others():
        print(f"train@{mode}: not resuming from {other}: it is the state of a run with other inputs, params "
              "or code (it is deleted once this run has finished an epoch)")
    try:
        return state.load()
    except ValueError as exc:
        print(f"warning: cannot resume from {state.path} ({exc}); starting from epoch 1", file=sys.stderr)
        return None


@dataclass
class EpochEnd:
    """What the stage does after every epoch: rewrite the history (for ``dvc plots`` while the
    run goes on) and save the state to resume from. A signal arriving meanwhile takes effect
    once both are written, so after an interruption they always agree."""

    history_out: Path
    state: ResumeState | None  #: None in the processes that do not write
    training: Training
    world: World
    saved: int = 0  #: the last epoch whose state is on disk

    def __call__(self, progress: Progress) -> None:
        rngs = self.world.gather_object(rng_states(self.training.device))  # each process's own generators
        if self.state is None or rngs is None:
            return
        with deferred_interrupts():
            write_text(self.history_out, history_csv(progress.history))
            self.state.save(self.training, progress, rngs)
            self.saved = progress.epoch


def interrupted(exc: KeyboardInterrupt, mode: str, epochs: int, end: EpochEnd | None) -> Interrupted:
    """Ctrl-C (or SIGTERM, SIGHUP) during training, with the line that says what is left and what to do
    (from the process that writes; the others stop without one)."""
    stopped = Interrupted.of(exc)
    if end is None or end.state is None:
        return stopped
    if end.saved:
        stopped.detail = (f"train@{mode} stopped after epoch {end.saved} of {epochs} and saved its state in "
                          f"{end.state.path}; run it again with the same inputs and params (dvc repro) to resume "
                          "from there")
    else:
        stopped.detail = (f"train@{mode} stopped during epoch 1 of {epochs}, before any epoch finished: nothing "
                          "was written to the stage's outputs and there is nothing to resume")
    return stopped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--inputs", type=Path, help="finetune: the image folders (default data/hymenoptera_data); "
                        "feature_extract: the features stage's folder (default data/features)")
    parser.add_argument("--weights", type=Path, default=Path("models/pretrained.pt"))
    parser.add_argument("--model-out", type=Path, help="default: models/<mode>.pt")
    parser.add_argument("--history", type=Path, help="default: plots/<mode>/history.csv")
    parser.add_argument("--record", type=Path, help="run record; default: reports/<mode>/train.json")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    params = load_params(args.params)
    settings = params.train.distributed
    asked = resolve_device(params.device)
    distributed.check(settings, asked, sync_batchnorm=args.mode == "finetune" and params.train.finetune.sync_batchnorm)
    threads = configure_threads(params.runtime.threads, processes=settings.nproc_per_node)
    distributed.run_processes(settings, asked, "stages.train", argv, threads=threads,
                              run=distributed.run_id(args.mode, params.digest(tracked_params(args.mode))),
                              work=lambda world, device: train(args, params, world, device, threads, started))


def train(args: argparse.Namespace, params: Params, world: World, device: torch.device, threads: int,
          started: float) -> None:
    """One training process: all of the run in one, or its share of it among several."""
    mode: str = args.mode
    finetune = mode == "finetune"
    inputs_path = args.inputs or Path("data/hymenoptera_data" if finetune else "data/features")
    model_out = args.model_out or Path(f"models/{mode}.pt")
    history_out = args.history or Path(f"plots/{mode}/history.csv")
    record_out = args.record or Path(f"reports/{mode}/train.json")
    recipe = params.train.mode(mode)
    configure_backends(device, params.train.deterministic)
    processes = params.train.distributed.nproc_per_node
    workers = resolve_workers(params.runtime.num_workers, device, processes) if finetune else 0
    if (warning := amp_warning(device, params.train.amp)) and world.main:
        print(warning, file=sys.stderr)
    seed_everything(params.seed)

    pretrained = read_pretrained_meta(args.weights, params.model)
    pre = resolve_preprocess(params.preprocess, pretrained["preprocess"])
    if finetune:
        inputs = image_inputs(inputs_path, pre, params, device, workers, world)
    else:
        inputs = feature_inputs(inputs_path, params, device, world)
    classes = inputs.classes
    model, head = pretrained_classifier(args.weights, pretrained, len(classes), pre.crop)

    if finetune:
        check_deterministic(model, device, params.train.deterministic)
        if params.train.finetune.sync_batchnorm and world.size > 1:  # same state_dict keys as BatchNorm
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        trained: nn.Module = model.to(device, memory_format=torch.channels_last)
        trained_params = list(model.parameters())
    else:  # only the head learns, from the stored outputs of the frozen backbone
        trained_params = freeze_backbone(model, head)
        trained = model.get_submodule(head.name).to(device)

    criterion = nn.CrossEntropyLoss(reduction="sum")  # the loop divides by each step's number of images
    # Fused on CUDA: one kernel per step, and the AMP scaler's step then needs no host sync.
    optimizer = optim.SGD(trained_params, lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay, fused=device.type == "cuda" or None)
    scheduler = lr_scheduler.StepLR(optimizer, step_size=recipe.step_size, gamma=recipe.gamma)

    sizes = {phase: len(loader.dataset) for phase, loader in inputs.loaders.items()}  # type: ignore[arg-type]
    processes = f", {world.size} processes" if world.size > 1 else ""
    if world.main:
        print(f"train@{mode}: {params.model.arch} ({pretrained['source']}), {len(classes)} classes "
              f"{classes}, {sizes['train']} train / {sizes['val']} val images, "
              f"{sum(p.numel() for p in trained_params):,} trainable parameters, {describe_device(device)}"
              f"{processes}, {threads} threads")
    training = Training(trained, optimizer, scheduler, device)
    state = None
    if world.main:  # the one process that writes: the state it saves is the whole run's
        state = ResumeState(model_out.parent / RESUME_FOLDER, mode, run_key(
            mode, params, tracked_params(mode), [inputs_path, args.weights, sidecar_path(args.weights)], device))
    saved = world.broadcast_object(saved_state(state, mode) if state else None)
    start = restore(saved, training, world.rank) if saved is not None else None
    if state is not None and start is not None:  # the finished epochs, for `dvc plots` until the next one ends
        print(f"train@{mode}: resuming after epoch {start.epoch} of {recipe.epochs} (state from {state.path})")
        write_text(history_out, history_csv(start.history))
    end = EpochEnd(history_out, state, training, world, saved=start.epoch if start else 0)
    try:
        result = train_model(
            trained, inputs.loaders, criterion, optimizer, scheduler, recipe.epochs, device,
            prepare=inputs.prepare, amp=params.train.amp, start=start, on_epoch=end, world=world,
        )
    except KeyboardInterrupt as exc:
        raise interrupted(exc, mode, recipe.epochs, end) from None
    if not world.main:
        return

    if finetune:
        best_state = result.best_state
    else:  # the whole classifier: pretrained backbone (with the best epoch's statistics) and trained head
        model.get_submodule(head.name).load_state_dict(result.best_state)
        if inputs.features and inputs.features.meta["batchnorm"] == "update":
            model.load_state_dict(inputs.features.batchnorm(result.best_epoch), strict=False)
        best_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_checkpoint(model_out, best_state, {
        "mode": mode,
        "arch": params.model.arch,
        "classes": classes,
        "head": head.name,
        "epoch": result.best_epoch,
        "val_acc": result.best_acc,
        "weights": params.model.weights,
        "weights_source": pretrained["source"],
        "weights_sha256": pretrained.get("sha256"),
        "preprocess": dataclasses.asdict(pre),
        "params_digest": params.digest(tracked_params(mode)),
    })
    last = result.history[-1]
    wall = time.perf_counter() - started
    write_json(record_out, run_record(
        device, threads, workers,
        best_epoch=result.best_epoch, best_val_acc=result.best_acc, epochs=len(result.history),
        final={"train_loss": last.train_loss, "train_acc": last.train_acc,
               "val_loss": last.val_loss, "val_acc": last.val_acc},
        wall_seconds=round(wall, 2), epoch_seconds=[round(s, 3) for s in result.epoch_seconds],
        train_images_per_second=round(result.train_images_per_second, 2),
        resumed_after_epoch=start.epoch if start else None,
        processes=world.size,
    ))
    state.remove()  # the outputs hold this run's results now: nothing left to resume
    print(f"train@{mode}: best val acc {result.best_acc:.4f} at epoch {result.best_epoch}, "
          f"{wall:.1f}s -> {model_out}")


if __name__ == "__main__":
    run_stage(main)
