"""Stage ``train@<strategy>``: transfer-learn the backbone as a strategy of
:mod:`transfer.strategies` says (docs/strategies.md compares them).

Writes the best epoch's checkpoint (``--model-out`` and its ``.json``), the history
(``--history``, rewritten after every epoch, so that ``dvc plots show`` shows a run as it
goes) and a run record (``--record``). After every epoch it saves the state an interrupted
run resumes from (:mod:`transfer.resume`); with ``train.distributed`` asking for several
processes it starts itself again under torchrun (:mod:`transfer.distributed`).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn, optim
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader

from transfer import distributed
from transfer.atomic import write_json, write_text
from transfer.checkpoints import (
    CheckpointMeta,
    PretrainedMeta,
    pretrained_classifier,
    read_start,
    save_checkpoint,
    sidecar_path,
    trained_classifier,
)
from transfer.datasets import EpochSampler, FeatureViews, TrainImages, ValImages
from transfer.devices import amp_warning, configure_threads, describe_device, resolve_device, resolve_workers
from transfer.distributed import World
from transfer.errors import UserError
from transfer.imagefolder import image_folders
from transfer.interrupts import Interrupted, deferred_interrupts
from transfer.models import Head, find_head, freeze_backbone
from transfer.params import Params, load_params
from transfer.preprocess import ModelInput, Preprocess, resolve_preprocess
from transfer.record import run_record
from transfer.reproducibility import check_deterministic, configure_backends, seed_everything
from transfer.resume import FOLDER as RESUME_FOLDER
from transfer.resume import ResumeState, Training, restore, rng_states, run_key
from transfer.stage import run_stage
from transfer.stored_features import PARAMS as FEATURE_PARAMS
from transfer.stored_features import TRAIN, VAL, StoredFeatures, read_features
from transfer.strategies import STRATEGIES, FinetuneRecipe, Recipe, Strategy
from transfer.training import (
    Diverged,
    EpochRecord,
    Progress,
    WarmUp,
    images_per_second,
    make_loader,
    param_groups,
    train_model,
)

#: How many processes train, and how they talk: with several, each computes on its share of
#: a batch and the sums differ in their last bits. ``rdzv_endpoint`` only says where they meet.
DISTRIBUTED = ("train.distributed.nproc_per_node", "train.distributed.nnodes", "train.distributed.backend")


def tracked_params(strategy: str) -> tuple[str, ...]:
    """The params this stage reads that can change its outputs, as dvc.yaml declares them."""
    return ("seed", "device", "model", "preprocess", "train.batch_size", "train.amp",
            "train.deterministic", f"train.{strategy}", *DISTRIBUTED)


@dataclass
class Inputs:
    """What a strategy trains on: its loaders, how a batch becomes the model's input, and
    for the stored features, the features (whose BatchNorm statistics it may need)."""

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
    loaders = epoch_loaders(train, val, (None, 1), params, device, world, workers)
    return Inputs(split["train"].classes, loaders, ModelInput(pre, device))


def feature_inputs(folder: Path, params: Params, device: torch.device, world: World) -> Inputs:
    """The frozen backbone's stored outputs: view ``(e - 1) % views`` of each image in epoch ``e``."""
    features = read_features(folder, params.digest(FEATURE_PARAMS))
    train = FeatureViews(features.array(TRAIN, "train"), features.labels("train"))
    val = FeatureViews(features.array(VAL, "val"), features.labels("val"))
    loaders = epoch_loaders(train, val, (train.features.shape[0], val.features.shape[0]), params, device, world, 0)
    return Inputs(features.meta.classes, loaders, None, features)


def epoch_loaders(train: TrainImages | FeatureViews, val: ValImages | FeatureViews, cycles: tuple[int | None, int],
                  params: Params, device: torch.device, world: World, workers: int) -> dict[str, DataLoader]:
    """Training batches in a seeded order, a last step of one image left out; validation in
    order, in inference batches. ``cycles``: each split's views (:class:`EpochSampler`)."""
    return {
        "train": make_loader(train, EpochSampler(len(train), seed=params.seed, shuffle=True, cycle=cycles[0]),
                             batch_size=params.train.batch_size, workers=workers, device=device, world=world,
                             drop_single=True),
        "val": make_loader(val, EpochSampler(len(val), seed=params.seed, shuffle=False, cycle=cycles[1]),
                           batch_size=params.runtime.inference_batch_size * world.size, workers=workers,
                           device=device, world=world),
    }


def starting_classifier(strategy: Strategy, path: Path, meta: PretrainedMeta | CheckpointMeta, classes: list[str],
                        crop: int) -> tuple[nn.Module, Head]:
    """The classifier training starts from: the pretrained backbone with a new head, or the
    trained classifier of the strategy this one starts from."""
    if isinstance(meta, PretrainedMeta):
        return pretrained_classifier(path, meta, len(classes), crop)
    if meta.classes != classes:
        raise UserError(f"{path} was trained on the classes {meta.classes}, the data has {classes}: run `dvc repro`")
    if meta.strategy != strategy.start:
        raise UserError(f"{path} was trained by {meta.strategy}, but this strategy starts from {strategy.start}'s "
                        "classifier: give --weights its checkpoint")
    model = trained_classifier(path, meta, torch.device("cpu"))
    return model, find_head(model)


@dataclass
class Setup:
    """What the loop trains (the classifier, or its head alone), and how."""

    trained: nn.Module
    optimizer: optim.Optimizer
    scheduler: lr_scheduler.LRScheduler
    warmup: WarmUp | None


def set_up(strategy: Strategy, recipe: Recipe, model: nn.Module, head: Head, params: Params, device: torch.device,
           world: World, crop: int, source: str) -> Setup:
    if strategy.trains == "head":  # from the stored outputs of the frozen backbone
        freeze_backbone(model, head)
        trained = model.get_submodule(head.name).to(device)
        groups: list[dict[str, Any]] = [{"params": list(trained.parameters()), "lr": recipe.lr}]
    else:
        if isinstance(recipe, FinetuneRecipe) and recipe.sync_batchnorm and world.size > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # the same state_dict keys as BatchNorm
        trained = model.to(device, memory_format=torch.channels_last)
        check_deterministic(model, device, params.train.deterministic, crop, source)
        groups = param_groups(model, head, recipe)
    # Fused on CUDA: one kernel per step, and the AMP scaler's step then needs no host sync.
    optimizer = optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                          fused=device.type == "cuda" or None)
    scheduler = lr_scheduler.StepLR(optimizer, step_size=recipe.step_size, gamma=recipe.gamma)
    warmup = None
    if isinstance(recipe, FinetuneRecipe) and recipe.freeze_epochs:
        warmup = WarmUp(recipe.freeze_epochs, model.get_submodule(head.name), groups[1]["params"])
    return Setup(trained, optimizer, scheduler, warmup)


def history_csv(history: list[EpochRecord]) -> str:
    """One row per epoch, numbers to 6 decimals (the csv module: pandas costs a stage 0.6 s to import)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EpochRecord.__dataclass_fields__)
    writer.writerows([v if isinstance(v, int) else round(v, 6) for v in record.as_row().values()] for record in history)
    return out.getvalue()


@dataclass
class EpochEnd:
    """What the stage does after every epoch: rewrite the history (for ``dvc plots`` while the
    run goes on) and save the state to resume from, with every process's random generators.
    A signal arriving meanwhile takes effect once both are written, so they always agree."""

    history_out: Path
    state: ResumeState | None  #: None in the processes that do not write
    training: Training
    world: World
    saved: int = 0  #: the last epoch whose state is on disk

    def __call__(self, progress: Progress) -> None:
        rngs = self.world.gather_object(rng_states(self.training.device))
        if self.state is None or rngs is None:
            return
        with deferred_interrupts():
            write_text(self.history_out, history_csv(progress.history), now=True)
            self.state.save(self.training, progress, rngs)
            self.saved = progress.epoch

    def interrupted(self, exc: KeyboardInterrupt, name: str, epochs: int) -> Interrupted:
        """The line that says what an interruption left and what to do (from the process that writes)."""
        stopped = Interrupted.of(exc)
        if self.state is not None and self.saved:
            stopped.detail = (f"train@{name} stopped after epoch {self.saved} of {epochs} and saved its state in "
                              f"{self.state.path}; run it again with the same inputs and params (dvc repro) to "
                              "resume from there")
        elif self.state is not None:
            stopped.detail = (f"train@{name} stopped during epoch 1 of {epochs}, before any epoch finished: nothing "
                              "was written to the stage's outputs and there is nothing to resume")
        return stopped


def resumed(state: ResumeState | None, name: str, world: World, training: Training) -> Progress | None:
    """The progress of this run's interrupted predecessor, restored into ``training``, or None
    to start at epoch 1. Process 0 reads the state and hands it to the others."""
    saved = None
    if state is not None:
        for other in state.others():  # saying so spares a user who expected a resume from wondering
            print(f"train@{name}: not resuming from {other}: it is the state of a run with other inputs, params "
                  "or code (it is deleted once this run has finished an epoch)")
        try:
            saved = state.load()
        except ValueError as exc:
            print(f"warning: cannot resume from {state.path} ({exc}); starting from epoch 1", file=sys.stderr)
    saved = world.broadcast_object(saved)
    return restore(saved, training, world.rank) if saved is not None else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=STRATEGIES, required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--inputs", type=Path, required=True, help="the image folders, or the features stage's folder")
    parser.add_argument("--weights", type=Path, required=True, help="what training starts from: models/pretrained.pt, "
                        "or the checkpoint of the strategy this one starts from")
    parser.add_argument("--model-out", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True)
    parser.add_argument("--record", type=Path, required=True, help="run record (timings, versions, device)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    params = load_params(args.params)
    recipe, settings = getattr(params.train, args.strategy), params.train.distributed
    asked = resolve_device(params.device, args.params)
    sync = f"train.{args.strategy}.sync_batchnorm" if getattr(recipe, "sync_batchnorm", False) else None
    distributed.check(settings, asked, args.params, sync_batchnorm=sync)
    threads = configure_threads(params.runtime.threads, processes=settings.nproc_per_node)
    distributed.run_processes(settings, asked, "stages.train", argv, threads=threads,
                              run=distributed.run_id(args.strategy, params.digest(tracked_params(args.strategy))),
                              work=lambda world, device: train(Run(args, params, world, device, threads, started,
                                                                   args.strategy, recipe)))


@dataclass
class Run:
    """One training process: what it was asked for, and where and how it runs."""

    args: argparse.Namespace
    params: Params
    world: World
    device: torch.device
    threads: int
    started: float
    name: str  #: the strategy
    recipe: Recipe
    workers: int = 0


def train(run: Run) -> None:
    """All of the run in one process, or its share of it among several."""
    args, params, world, device, name = run.args, run.params, run.world, run.device, run.name
    strategy = STRATEGIES[name]
    configure_backends(device, params.train.deterministic)
    if (warning := amp_warning(device, params.train.amp)) and world.main:
        print(warning, file=sys.stderr)
    seed_everything(params.seed)

    meta = read_start(args.weights, CheckpointMeta if strategy.start else PretrainedMeta, params.model)
    pre = resolve_preprocess(params.preprocess, meta.preprocess, args.params)
    if strategy.inputs == "images":
        run.workers = resolve_workers(params.runtime.num_workers, device, params.train.distributed.nproc_per_node)
        inputs = image_inputs(args.inputs, pre, params, device, run.workers, world)
    else:
        inputs = feature_inputs(args.inputs, params, device, world)
    model, head = starting_classifier(strategy, args.weights, meta, inputs.classes, pre.crop)
    setup = set_up(strategy, run.recipe, model, head, params, device, world, pre.crop, args.params)
    if world.main:
        announce(run, meta, inputs, setup)
    training = Training(setup.trained, setup.optimizer, setup.scheduler, device)
    state = None
    if world.main:  # the one process that writes: the state it saves is the whole run's
        inputs_files = [args.inputs, args.weights, sidecar_path(args.weights)]
        key = run_key(name, params, tracked_params(name), inputs_files, device, __name__)
        state = ResumeState(args.model_out.parent / RESUME_FOLDER, name, key)
    start = resumed(state, name, world, training)
    if start is not None and state is not None:  # the finished epochs, for `dvc plots` until the next one ends
        print(f"train@{name}: resuming after epoch {start.epoch} of {run.recipe.epochs} (state from {state.path})")
        write_text(args.history, history_csv(start.history), now=True)
    end = EpochEnd(args.history, state, training, world, saved=start.epoch if start else 0)
    try:
        progress = train_model(setup.trained, inputs.loaders, nn.CrossEntropyLoss(reduction="sum"), setup.optimizer,
                               setup.scheduler, run.recipe.epochs, device, prepare=inputs.prepare,
                               amp=params.train.amp, warmup=setup.warmup, start=start, on_epoch=end, world=world)
    except KeyboardInterrupt as exc:
        raise end.interrupted(exc, name, run.recipe.epochs) from None
    except Diverged as exc:
        raise UserError(f"train@{name}: {exc}; nothing was written. The learning rate is too large for this model "
                        f"and data: lower train.{name}.lr") from None
    if state is not None:
        write_outputs(run, model, head, meta, pre, inputs, progress, start.epoch if start else None)
        state.remove()  # the outputs hold this run's results now: nothing left to resume
        print(f"train@{name}: best val acc {progress.best_acc:.4f} at epoch {progress.best_epoch}, "
              f"{time.perf_counter() - run.started:.1f}s -> {args.model_out}")


def announce(run: Run, meta: PretrainedMeta | CheckpointMeta, inputs: Inputs, setup: Setup) -> None:
    """The run's first line: what trains, on what, where."""
    trainable = sum(p.numel() for group in setup.optimizer.param_groups for p in group["params"])
    processes = f", {run.world.size} processes" if run.world.size > 1 else ""
    source = meta.source if isinstance(meta, PretrainedMeta) else run.args.weights
    sizes = {phase: len(loader.dataset) for phase, loader in inputs.loaders.items()}  # type: ignore[arg-type]
    print(f"train@{run.name}: {run.params.model.arch} ({source}), {len(inputs.classes)} classes {inputs.classes}, "
          f"{sizes['train']} train / {sizes['val']} val images, {trainable:,} trainable parameters, "
          f"{describe_device(run.device)}{processes}, {run.threads} threads")


def write_outputs(run: Run, model: nn.Module, head: Head, meta: PretrainedMeta | CheckpointMeta, pre: Preprocess,
                  inputs: Inputs, progress: Progress, resumed_after: int | None) -> None:
    """The best epoch's classifier, its sidecar, and the run record."""
    best = progress.best_state
    if STRATEGIES[run.name].trains == "head":  # the whole classifier: the frozen backbone and the trained head
        model.get_submodule(head.name).load_state_dict(best)
        if inputs.features and inputs.features.meta.batchnorm == "update":  # the best epoch's statistics
            model.load_state_dict(inputs.features.batchnorm(progress.best_epoch), strict=False)
        best = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    source = meta.source if isinstance(meta, PretrainedMeta) else meta.weights_source
    sha256 = meta.sha256 if isinstance(meta, PretrainedMeta) else meta.weights_sha256
    params = run.params
    save_checkpoint(run.args.model_out, best, CheckpointMeta(
        strategy=run.name, arch=params.model.arch, classes=inputs.classes, head=head.name, epoch=progress.best_epoch,
        val_acc=progress.best_acc, weights=params.model.weights, weights_source=source, weights_sha256=sha256,
        preprocess=pre, params_digest=params.digest(tracked_params(run.name))))
    last = progress.history[-1]
    write_json(run.args.record, run_record(
        run.device, run.threads, run.workers,
        best_epoch=progress.best_epoch, best_val_acc=progress.best_acc, epochs=len(progress.history),
        final={k: v for k, v in asdict(last).items() if k not in ("epoch", "lr")},
        wall_seconds=round(time.perf_counter() - run.started, 2),
        epoch_seconds=[round(s, 3) for s in progress.epoch_seconds],
        train_images_per_second=round(images_per_second(progress, inputs.loaders["train"]), 2),
        resumed_after_epoch=resumed_after, processes=run.world.size,
    ))


if __name__ == "__main__":
    run_stage(main)
