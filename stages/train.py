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
import time
from dataclasses import astuple
from typing import Any

import torch
from torch import nn, optim
from torch.optim import lr_scheduler

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
from transfer.devices import configure_threads, describe_device, resolve_device, resolve_workers, warn_slow_amp
from transfer.distributed import World
from transfer.errors import UserError, say
from transfer.imagefolder import image_folders
from transfer.interrupts import Interrupted, deferred_interrupts
from transfer.models import find_head, freeze_backbone
from transfer.params import Params, load_params
from transfer.preprocess import ModelInput, resolve_preprocess
from transfer.record import run_record
from transfer.reproducibility import check_deterministic, configure_backends, seed_everything
from transfer.resume import FOLDER as RESUME_FOLDER
from transfer.resume import ResumeState, restore, rng_states, run_key
from transfer.stage import run_stage, stage_parser
from transfer.stored_features import BACKBONE_PARAMS, TRAIN, VAL, read_features
from transfer.stored_features import PARAMS as FEATURE_PARAMS
from transfer.strategies import STRATEGIES, FinetuneRecipe, Recipe
from transfer.training import Diverged, EpochRecord, Progress, WarmUp, cpu_state, make_loader, train_model

#: How many processes train, and how they talk: with several, each computes on its share of
#: a batch and the sums differ in their last bits. ``rdzv_endpoint`` only says where they meet.
DISTRIBUTED = ("train.distributed.nproc_per_node", "train.distributed.nnodes", "train.distributed.backend")


def tracked_params(strategy: str) -> tuple[str, ...]:
    """The params this stage reads that can change its outputs, as dvc.yaml declares them."""
    return (*BACKBONE_PARAMS, f"train.{strategy}", *DISTRIBUTED)


def history_csv(history: list[EpochRecord]) -> str:
    """One row per epoch, numbers to 6 decimals (the csv module: pandas costs a stage 0.6 s to import)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EpochRecord.__dataclass_fields__)
    writer.writerows([round(v, 6) for v in astuple(record)] for record in history)  # the epoch stays an int
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, inputs="the image folders, or the features stage's folder",
                          weights="what training starts from: models/pretrained.pt, or the checkpoint of the "
                          "strategy this one starts from", model_out=None, history=None,
                          record="run record (timings, versions, device)")
    parser.add_argument("--strategy", choices=STRATEGIES, required=True)
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
                              work=lambda world, device: train(args, params, recipe, world, device, threads, started))


def train(args: argparse.Namespace, params: Params, recipe: Recipe, world: World, device: torch.device, threads: int,
          started: float) -> None:
    """All of the run in one process, or its share of it among several."""
    name = args.strategy
    strategy = STRATEGIES[name]
    configure_backends(device, params.train.deterministic)
    if world.main:
        warn_slow_amp(device, params.train.amp)
    seed_everything(params.seed)

    # What it trains on: loaders of the images or of the stored features, and how a batch
    # becomes the model's input.
    meta = read_start(args.weights, CheckpointMeta if strategy.start else PretrainedMeta, params.model)
    pretrained = isinstance(meta, PretrainedMeta)
    pre = resolve_preprocess(params.preprocess, meta.preprocess, args.params)
    workers, prepare, features = 0, None, None
    if strategy.inputs == "images":  # decoded once and cached; a fresh augmented view of each per epoch
        workers = resolve_workers(params.runtime.num_workers, device, params.train.distributed.nproc_per_node)
        split = image_folders(args.inputs)
        budget = params.runtime.image_cache_mb * 2**20
        val = ValImages(split["val"], pre, cache_bytes=budget)  # small crops first, then whole images
        val.images.fill("decode val")
        data = TrainImages(split["train"], pre, seed=params.seed, cache_bytes=budget - val.images.used)
        data.images.fill("decode train")
        classes, views, prepare = split["train"].classes, (None, 1), ModelInput(pre, device)
    else:  # the frozen backbone's stored outputs: view ``(e - 1) % views`` of each image in epoch ``e``
        features = read_features(args.inputs, params.digest(FEATURE_PARAMS))
        data = FeatureViews(features.array(TRAIN, "train"), features.labels("train"))
        val = FeatureViews(features.array(VAL, "val"), features.labels("val"))
        classes, views = features.meta.classes, (data.features.shape[0], val.features.shape[0])
    # Training batches in a seeded order, a last step of one image left out; validation in
    # order, in inference batches. ``views``: each split's views (:class:`EpochSampler`).
    loaders = {
        "train": make_loader(data, EpochSampler(len(data), seed=params.seed, shuffle=True, cycle=views[0]),
                             batch_size=params.train.batch_size, workers=workers, device=device, world=world,
                             drop_single=True),
        "val": make_loader(val, EpochSampler(len(val), seed=params.seed, shuffle=False, cycle=views[1]),
                           batch_size=params.runtime.inference_batch_size * world.size, workers=workers,
                           device=device, world=world),
    }

    # What the loop trains (the classifier, or its head alone), and how.
    # It starts from the pretrained backbone with a new head, or from the trained classifier of
    # the strategy this one starts from.
    if pretrained:
        model, head = pretrained_classifier(args.weights, meta, len(classes), pre.crop)
    elif meta.classes != classes:
        raise UserError(f"{args.weights} was trained on the classes {meta.classes}, the data has {classes}: run "
                        "`dvc repro`")
    elif meta.strategy != strategy.start:
        raise UserError(f"{args.weights} was trained by {meta.strategy}, but this strategy starts from "
                        f"{strategy.start}'s classifier: give --weights its checkpoint")
    else:
        model = trained_classifier(args.weights, meta, torch.device("cpu"))
        head = find_head(model)
    classifier = model.get_submodule(head.name)  # the same module after a conversion to SyncBatchNorm
    head_params = list(classifier.parameters())
    groups: list[dict[str, Any]] = [{"params": head_params}]  # first, at SGD's lr: the lr the history records
    warmup = None
    if strategy.trains == "head":  # from the stored outputs of the frozen backbone
        freeze_backbone(model, head)
        trained = classifier.to(device)
    else:
        if isinstance(recipe, FinetuneRecipe):  # the backbone at its scale of the head's lr
            if recipe.sync_batchnorm and world.size > 1:  # the same parameters and state_dict keys as BatchNorm
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            backbone = [p for p in model.parameters() if all(p is not q for q in head_params)]
            groups.append({"params": backbone, "lr": recipe.lr * recipe.backbone_lr_scale})
            if recipe.freeze_epochs:
                warmup = WarmUp(recipe.freeze_epochs, classifier, backbone)
        trained = model.to(device, memory_format=torch.channels_last)
        check_deterministic(model, device, params.train.deterministic, pre.crop, args.params)
    # Fused on CUDA: one kernel per step, and the AMP scaler's step then needs no host sync.
    optimizer = optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                          fused=device.type == "cuda" or None)
    scheduler = lr_scheduler.StepLR(optimizer, step_size=recipe.step_size, gamma=recipe.gamma)
    training = {"model": trained, "optimizer": optimizer, "scheduler": scheduler}
    if world.main:
        trainable = sum(p.numel() for p in trained.parameters())  # what the optimizer's groups hold
        source = meta.source if pretrained else args.weights
        print(f"train@{name}: {params.model.arch} ({source}), {len(classes)} classes {classes}, {len(data)} train / "
              f"{len(val)} val images, {trainable:,} trainable parameters, {describe_device(device)}"
              f"{f', {world.size} processes' if world.size > 1 else ''}, {threads} threads")

    # Resuming: process 0 reads the state of this run's interrupted predecessor, if any, and
    # hands it to the others.
    state, saved = None, None
    if world.main:  # the one process that writes: the state it saves is the whole run's
        state = ResumeState(args.model_out.parent / RESUME_FOLDER, name, run_key(
            name, params, tracked_params(name), [args.inputs, args.weights, sidecar_path(args.weights)], device,
            __name__))
        for other in state.others():  # saying so spares a user who expected a resume from wondering
            print(f"train@{name}: not resuming from {other}: it is the state of a run with other inputs, params "
                  "or code (it is deleted once this run has finished an epoch)")
        try:
            saved = state.load()
        except ValueError as exc:
            say(f"warning: cannot resume from {state.path} ({exc}); starting from epoch 1")
    saved = world.broadcast_object(saved)
    start = restore(saved, training, device, world.rank) if saved is not None else None
    done = start.epoch if start else 0  # the last epoch whose state is on disk
    if start and state:  # the finished epochs, for `dvc plots` until the next one ends
        print(f"train@{name}: resuming after epoch {done} of {recipe.epochs} (state from {state.path})")
        write_text(args.history, history_csv(start.history), now=True)

    def end_epoch(progress: Progress) -> None:
        """Rewrite the history (for ``dvc plots`` while the run goes on) and save the state to
        resume from, with every process's random generators. A signal arriving meanwhile
        takes effect once both are written, so they always agree."""
        nonlocal done
        rngs = world.gather_object(rng_states(device))
        if state is None or rngs is None:  # the processes that do not write
            return
        with deferred_interrupts():
            write_text(args.history, history_csv(progress.history), now=True)
            state.save(training, progress, rngs)
            done = progress.epoch

    try:
        progress = train_model(trained, loaders, nn.CrossEntropyLoss(reduction="sum"), optimizer, scheduler,
                               recipe.epochs, device, prepare=prepare, amp=params.train.amp, warmup=warmup,
                               start=start, on_epoch=end_epoch, world=world)
    except KeyboardInterrupt as exc:  # the line that says what it left and what to do
        stopped = Interrupted.of(exc)
        if state is not None:
            stopped.detail = (
                f"train@{name} stopped after epoch {done} of {recipe.epochs} and saved its state in {state.path}; "
                "run it again with the same inputs and params (dvc repro) to resume from there" if done else
                f"train@{name} stopped during epoch 1 of {recipe.epochs}, before any epoch finished: nothing was "
                "written to the stage's outputs and there is nothing to resume")
        raise stopped from None
    except Diverged as exc:
        raise UserError(f"train@{name}: {exc}; nothing was written. The learning rate is too large for this model "
                        f"and data: lower train.{name}.lr") from None
    if state is None:
        return

    # The best epoch's classifier, its sidecar, and the run record.
    best = progress.best_state
    if strategy.trains == "head":  # the whole classifier: the frozen backbone and the trained head
        classifier.load_state_dict(best)
        if features and features.meta.batchnorm == "update":  # the best epoch's statistics
            model.load_state_dict(features.batchnorm(progress.best_epoch), strict=False)
        best = cpu_state(model)
    save_checkpoint(args.model_out, best, CheckpointMeta(
        strategy=name, arch=params.model.arch, classes=classes, head=head.name, epoch=progress.best_epoch,
        val_acc=progress.best_acc, weights=params.model.weights,
        weights_source=meta.source if pretrained else meta.weights_source,
        weights_sha256=meta.sha256 if pretrained else meta.weights_sha256,
        preprocess=pre, params_digest=params.digest(tracked_params(name))))
    write_json(args.record, run_record(
        device, threads, workers, started, best_epoch=progress.best_epoch, best_val_acc=progress.best_acc,
        epochs=recipe.epochs,
        final={k: v for k, v in progress.history[-1].as_row().items() if k not in ("epoch", "lr")},
        epoch_seconds=[round(s, 3) for s in progress.epoch_seconds],
        # over the training phases' time of the epochs this run and those it resumed trained
        train_images_per_second=round(sum(loaders["train"].batch_sampler.sizes()) * recipe.epochs  # type: ignore[union-attr]
                                      / progress.train_seconds, 2),
        resumed_after_epoch=start.epoch if start else None, processes=world.size,
    ))
    state.remove()  # the outputs hold this run's results now: nothing left to resume
    print(f"train@{name}: best val acc {progress.best_acc:.4f} at epoch {progress.best_epoch}, "
          f"{time.perf_counter() - started:.1f}s -> {args.model_out}")


if __name__ == "__main__":
    run_stage(main)
