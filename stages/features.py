"""Stage ``features``: the frozen backbone's outputs, computed once for the strategies that train
the head alone on them (``train@feature_extract``); see :mod:`transfer.stored_features`.

A change to the head's recipe (lr, momentum, weight decay, the schedule) then retrains in
seconds without running the backbone again. The run record goes to ``--record``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from transfer import distributed
from transfer.atomic import atomic_dir, write_json
from transfer.checkpoints import PretrainedMeta, pretrained_classifier, read_start, save_tensors
from transfer.datasets import WORKER_START, EpochSampler, Pair, TrainImages, ValImages, ordered_loader
from transfer.devices import amp_warning, autocast, configure_threads, resolve_device, resolve_workers
from transfer.distributed import World
from transfer.errors import UserError
from transfer.imagefolder import Split, image_folders
from transfer.interrupts import quiet_loader_worker
from transfer.params import Params, load_params
from transfer.preprocess import ModelInput, Preprocess, resolve_preprocess
from transfer.record import run_record
from transfer.reproducibility import configure_backends, seed_everything
from transfer.stage import run_stage
from transfer.stored_features import (
    BATCHNORM,
    META,
    PARAMS,
    TRAIN,
    VAL,
    BackboneOutputs,
    FeatureWriter,
    batchnorm_buffers,
    head_inputs,
    head_is_last,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, required=True, help="the image folders")
    parser.add_argument("--weights", type=Path, required=True, help="the weights stage's output")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--record", type=Path, required=True, help="run record (timings, versions, device)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    params = load_params(args.params)
    asked = resolve_device(params.device, args.params)
    if params.train.feature_extract.batchnorm == "update":  # one batch after another: one process
        compute(args, params, distributed.current(), asked, configure_threads(params.runtime.threads), started)
        return
    # With train.distributed asking for several processes, each runs the backbone on its share
    # of the images and process 0 writes them all: the same file as from one process.
    settings = params.train.distributed
    distributed.check(settings, asked, args.params)
    threads = configure_threads(params.runtime.threads, processes=settings.nproc_per_node)
    distributed.run_processes(settings, asked, "stages.features", argv, threads=threads,
                              run=distributed.run_id("features", params.digest(PARAMS)),
                              work=lambda world, device: compute(args, params, world, device, threads, started))


@dataclass
class Backbone:
    """The pretrained classifier, run for what its head receives."""

    model: nn.Module
    head: nn.Module
    head_name: str
    prepare: ModelInput
    amp: bool

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """The head's input for a uint8 batch."""
        with head_inputs(self.head) as captured, torch.no_grad(), autocast(self.prepare.device, self.amp):
            self.model(self.prepare(pixels))
        return captured[0]


def backbone(args: argparse.Namespace, params: Params, split: dict[str, Split], device: torch.device,
             ) -> tuple[Backbone, Preprocess, tuple[int, ...]]:
    """The backbone on ``device``, its preprocessing, and the shape of one image's features."""
    meta = read_start(args.weights, PretrainedMeta, params.model)
    pre = resolve_preprocess(params.preprocess, meta.preprocess, args.params)
    model, head = pretrained_classifier(args.weights, meta, len(split["train"].classes), pre.crop)
    head_module = model.get_submodule(head.name)
    probe = torch.zeros(1, 3, pre.crop, pre.crop)
    if not head_is_last(model, head_module, probe):
        raise UserError(f"{params.model.arch} computes more after its classification head ({head.name}), so its "
                        "frozen backbone's outputs cannot be stored for feature_extract; train it with finetune")
    with torch.inference_mode(), head_inputs(head_module) as captured:
        model.eval()(probe)
    model = model.to(device, memory_format=torch.channels_last)
    shape = tuple(captured[0].shape[1:])
    return Backbone(model, head_module, head.name, ModelInput(pre, device), params.train.amp), pre, shape


@dataclass
class Passes:
    """The backbone over (view, image) pairs, in batches; of several processes, each computes
    every ``world.size``-th batch and process 0 gathers and writes them all."""

    backbone: Backbone
    writer: FeatureWriter
    world: World
    processes: int  #: single-threaded loader processes that run the backbone (the CPU), or 0: here
    workers: int

    def run(self, dataset: Dataset, pairs: Sequence[Pair], batch_size: int, name: str, desc: str) -> None:
        chunks = [pairs[start:start + batch_size] for start in range(0, len(pairs), batch_size)]
        mine = chunks[self.world.rank::self.world.size]
        if self.processes:
            batches: Iterable[tuple[Sequence[Pair], torch.Tensor]] = DataLoader(
                BackboneOutputs(dataset, mine, self.backbone), batch_size=None, num_workers=self.processes,
                worker_init_fn=quiet_loader_worker, multiprocessing_context=WORKER_START)
        else:
            loader = ordered_loader(dataset, [p for chunk in mine for p in chunk], batch_size=batch_size,
                                    workers=self.workers, device=self.backbone.prepare.device)
            batches = ((chunk, self.backbone(pixels).cpu()) for chunk, (pixels, _) in zip(mine, loader, strict=True))
        rounds = -(-len(chunks) // self.world.size)
        for chunk, outputs in tqdm(self.world.gather(iter(batches), rounds), desc=desc, total=len(chunks),
                                   unit="batch", leave=False, disable=None if self.world.main else True):
            keys = torch.tensor(chunk)
            self.writer.write(name, keys[:, 0], keys[:, 1], outputs)


def compute(args: argparse.Namespace, params: Params, world: World, device: torch.device, threads: int,
            started: float) -> None:
    """The backbone's outputs, in one process or as one of several."""
    recipe = params.train.feature_extract
    update = recipe.batchnorm == "update"
    if update and world.size > 1:
        raise UserError("batchnorm: update is computed by one process: run the features stage without torchrun")
    if (warning := amp_warning(device, params.train.amp)) and world.main:
        print(warning, file=sys.stderr)
    configure_backends(device, params.train.deterministic)
    seed_everything(params.seed)
    split = image_folders(args.data)
    model, pre, feature_shape = backbone(args, params, split, device)

    # Frozen: each image is decoded once and all its views made in a row, so nothing needs
    # caching. Update: every epoch goes over all images again, so they are decoded once and kept.
    budget = params.runtime.image_cache_mb * 2**20 if update else 0
    views = recipe.epochs if update or recipe.views == "auto" else recipe.views  # 0: no augmentation
    stored = max(views, 1)  # no augmentation still stores one view: the validation crop
    val = ValImages(split["val"], pre, cache_bytes=budget)
    val.images.fill("decode val")
    train = TrainImages(split["train"], pre, seed=params.seed, cache_bytes=budget - val.images.used, augment=views > 0)
    train.images.fill("decode train")
    # On the CPU the frozen backbone runs in loader processes, one thread each: on two cores two
    # single-threaded processes get through about 20% more images per second than one process
    # whose two threads wait for each other at every layer. They get the backbone, closures
    # included, so they must be forked; elsewhere the backbone runs here.
    cpu_processes = device.type == "cpu" and not update and threads > 1 and WORKER_START == "fork"
    passes = Passes(model, FeatureWriter(), world, threads if cpu_processes else 0,
                    resolve_workers(params.runtime.num_workers, device, params.train.distributed.nproc_per_node))
    n_train, n_val, batch = len(train), len(val), params.runtime.inference_batch_size
    with atomic_dir(args.out) if world.main else contextlib.nullcontext(None) as tmp:
        if tmp is not None:
            passes.writer.open(tmp, feature_shape, (stored, n_train), (recipe.epochs if update else 1, n_val))
        if not update:  # a fixed function of the image: every view of every image, once
            model.model.eval()
            passes.run(train, [(v, i) for i in range(n_train) for v in range(stored)], batch, TRAIN,
                       f"features: {stored} view(s) of {n_train} train images")
            passes.run(val, [(0, i) for i in range(n_val)], batch, VAL, f"features: {n_val} val images")
        else:
            statistics = drifting(passes, train, val, params, recipe.epochs)
            save_tensors(tmp / BATCHNORM, statistics)
        passes.writer.close()
        if tmp is None:
            return  # process 0 writes the rest
        relative = {name: [[Path(p).relative_to(args.data / name).as_posix(), label] for p, label in s.samples]
                    for name, s in split.items() if name in ("train", "val")}
        write_json(tmp / META, {
            "arch": params.model.arch, "weights": params.model.weights, "head": model.head_name,
            "classes": split["train"].classes, "feature_shape": list(feature_shape),
            "views": views, "batchnorm": recipe.batchnorm, "preprocess": pre.model_dump(),
            "samples": relative, "params_digest": params.digest(PARAMS),
        })
    seconds = time.perf_counter() - started
    images = stored * n_train + n_val * (recipe.epochs if update else 1)
    write_json(args.record, run_record(device, threads, passes.processes or passes.workers,
                                       wall_seconds=round(seconds, 2), backbone_passes=images,
                                       images_per_second=round(images / seconds, 2), processes=world.size))
    print(f"features: {stored} view(s) of {n_train} train and {n_val} val images through {params.model.arch} "
          f"-> {args.out} ({seconds:.1f}s)")


def drifting(passes: Passes, train: TrainImages, val: ValImages, params: Params, epochs: int,
             ) -> dict[str, torch.Tensor]:
    """``batchnorm: update``: the statistics follow each epoch's training batches, exactly as
    training draws them, so each epoch's outputs and statistics are computed in turn."""
    statistics: dict[str, torch.Tensor] = {}
    sampler = EpochSampler(len(train), seed=params.seed, shuffle=True, cycle=None)
    batch = params.train.batch_size
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        pairs = list(sampler)
        if len(pairs) % batch == 1:  # training leaves out a last step of a single image, so these do too
            pairs = pairs[:-1]
        passes.backbone.model.train()  # the tutorial's model.train(): BatchNorm uses and follows the batch
        passes.run(train, pairs, batch, TRAIN, f"features: epoch {epoch} train")
        passes.backbone.model.eval()
        passes.run(val, [(epoch - 1, i) for i in range(len(val))], params.runtime.inference_batch_size, VAL,
                   f"features: epoch {epoch} val")
        statistics |= {f"{epoch}/{k}": v for k, v in batchnorm_buffers(passes.backbone.model).items()}
    return statistics


if __name__ == "__main__":
    run_stage(main)
