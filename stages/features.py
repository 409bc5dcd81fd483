"""Stage ``features``: the frozen backbone's outputs, computed once for the strategies that train
the head alone on them (``train@feature_extract``); see :mod:`transfer.stored_features`.

A change to the head's recipe (lr, momentum, weight decay, the schedule) then retrains in
seconds without running the backbone again. The run record goes to ``--record``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, default_collate
from tqdm import tqdm

from transfer import distributed
from transfer.atomic import atomic_dir, write_json
from transfer.checkpoints import PretrainedMeta, pretrained_classifier, read_start, save_tensors
from transfer.datasets import WORKER_START, EpochSampler, Pair, TrainImages, ValImages, loader_options
from transfer.devices import autocast, configure_threads, resolve_device, resolve_workers, warn_slow_amp
from transfer.errors import UserError
from transfer.imagefolder import image_folders
from transfer.params import Params, load_params
from transfer.preprocess import ModelInput, resolve_preprocess
from transfer.record import run_record
from transfer.reproducibility import configure_backends, seed_everything
from transfer.stage import run_stage, stage_parser
from transfer.stored_features import BATCHNORM, META, PARAMS, TRAIN, VAL, head_inputs


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, data="the image folders", weights="the weights stage's output", out=None,
                          record="run record (timings, versions, device)")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    asked = resolve_device(params.device, args.params)
    if params.train.feature_extract.batchnorm == "update":  # one batch after another: one process
        compute(args, params, distributed.current(), asked, configure_threads(params.runtime.threads))
        return
    # With train.distributed asking for several processes, each runs the backbone on its share
    # of the images and process 0 writes them all: the same file as from one process.
    settings = params.train.distributed
    distributed.check(settings, asked, args.params)
    threads = configure_threads(params.runtime.threads, processes=settings.nproc_per_node)
    distributed.run_processes(settings, asked, "stages.features", argv, threads=threads,
                              run=distributed.run_id("features", params.digest(PARAMS)),
                              work=lambda world, device: compute(args, params, world, device, threads))


def compute(args: argparse.Namespace, params: Params, world: distributed.World, device: torch.device,
            threads: int) -> None:
    """The backbone's outputs, in one process or as one of several: each computes every
    ``world.size``-th batch, and process 0 gathers and writes them all."""
    started = time.perf_counter()
    recipe = params.train.feature_extract
    update = recipe.batchnorm == "update"
    if update and world.size > 1:
        raise UserError("batchnorm: update is computed by one process: run the features stage without torchrun")
    if world.main:
        warn_slow_amp(device, params.train.amp)
    configure_backends(device, params.train.deterministic)
    seed_everything(params.seed)
    split = image_folders(args.data)
    meta = read_start(args.weights, PretrainedMeta, params.model)
    pre = resolve_preprocess(params.preprocess, meta.preprocess, args.params)
    model, head = pretrained_classifier(args.weights, meta, len(split["train"].classes), pre.crop)
    head_module = model.get_submodule(head.name)
    # Training the head on stored head inputs is training the model only where the model's
    # output is what the head makes of them (checked on a blank image in eval mode; NaN equal to
    # NaN, so that weights that overflow are told as such by the passes below).
    with torch.inference_mode(), head_inputs(head_module) as captured:
        result = model.eval()(torch.zeros(1, 3, pre.crop, pre.crop))
        if len(captured) != 1 or not torch.equal(head_module(captured[0]).nan_to_num(), result.nan_to_num()):
            raise UserError(f"{params.model.arch} computes more after its classification head ({head.name}), "
                            "so its frozen backbone's outputs cannot be stored for feature_extract; train it with "
                            "finetune")
    feature_shape = captured[0].shape[1:]
    model = model.to(device, memory_format=torch.channels_last)
    prepare = ModelInput(pre, device)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        """The head's input for a uint8 batch."""
        with head_inputs(head_module) as captured, torch.no_grad(), autocast(device, params.train.amp):
            model(prepare(pixels))
        return captured[0]

    # Frozen: each image is decoded once and all its views made in a row, so nothing needs
    # caching. Update: every epoch goes over all images again, so they are decoded once and kept.
    budget = params.runtime.image_cache_mb * 2**20 if update else 0
    views = recipe.epochs if recipe.views == "auto" else recipe.views  # 0: no augmentation; update: auto
    stored = max(views, 1)  # no augmentation still stores one view: the validation crop
    n_train, n_val, batch = len(split["train"]), len(split["val"]), params.runtime.inference_batch_size
    passes = recipe.epochs if update else 1  # update: each epoch's statistics and val outputs; frozen: one pass
    # On the CPU the frozen backbone runs in loader processes, one thread each: on two cores two
    # single-threaded processes get through about 20% more images per second than one process
    # whose two threads wait for each other at every layer. They get the backbone, closures
    # included, so they must be forked; elsewhere the backbone runs here.
    in_loader = device.type == "cpu" and not update and threads > 1 and WORKER_START == "fork"
    workers = threads if in_loader else resolve_workers(params.runtime.num_workers, device,
                                                        params.train.distributed.nproc_per_node)
    with atomic_dir(args.out) if world.main else contextlib.nullcontext() as tmp:
        arrays = {} if tmp is None else allocate(tmp, {TRAIN: (stored, n_train, *feature_shape),
                                                       VAL: (passes, n_val, *feature_shape)})
        val = ValImages(split["val"], pre, cache_bytes=budget)
        val.images.fill("decode val")
        train = TrainImages(split["train"], pre, seed=params.seed, cache_bytes=budget - val.images.used,
                            augment=views > 0)
        train.images.fill("decode train")

        def run(dataset: Dataset, pairs: list[Pair], batch_size: int, name: str, desc: str) -> None:
            """The backbone over (view, image) pairs in batches, into ``arrays[name]``."""
            chunks = list(BatchSampler(pairs, batch_size, drop_last=False))

            def load(chunk: list[Pair]) -> tuple[list[Pair], torch.Tensor]:  # in a loader process, if any
                pixels = default_collate([dataset[key] for key in chunk])[0]
                return chunk, forward(pixels) if in_loader else pixels

            loader = DataLoader(chunks[world.rank::world.size], batch_size=None, collate_fn=load,  # type: ignore[arg-type]
                                **loader_options(workers, device))
            batches = ((chunk, x if in_loader else forward(x).cpu()) for chunk, x in loader)
            for chunk, outputs in tqdm(world.gather(batches, -(-len(chunks) // world.size)), desc=desc,
                                       total=len(chunks), unit="batch", leave=False,
                                       disable=None if world.main else True):
                if not outputs.isfinite().all():  # NaN or inf: training on them would learn nothing
                    raise UserError(f"the backbone's outputs for {name} are not all finite numbers, so the stored "
                                    f"features would not be finite numbers: check model.weights ({args.weights}) "
                                    f"and preprocess.mean/std in {args.params}")
                arrays[name][tuple(zip(*chunk, strict=True))] = outputs.float().numpy()

        # Frozen: a fixed function of the image, so one pass over every view of every image.
        # Update: the statistics follow each epoch's training batches, exactly as training draws
        # them, so each epoch's outputs and statistics are computed in turn.
        sampler = EpochSampler(n_train, seed=params.seed, shuffle=True, cycle=None)
        statistics: dict[str, torch.Tensor] = {}
        for epoch in range(1, passes + 1):
            sampler.set_epoch(epoch)
            # Training leaves out a last step of a single image, so these do too.
            pairs = (list(sampler)[:n_train - (n_train % params.train.batch_size == 1)] if update else
                     [(v, i) for i in range(n_train) for v in range(stored)])
            model.train(update)  # the tutorial's model.train(): BatchNorm uses and follows the batch
            run(train, pairs, params.train.batch_size if update else batch, TRAIN, f"features: train {epoch}")
            model.eval()
            run(val, [(epoch - 1, i) for i in range(n_val)], batch, VAL, f"features: val {epoch}")
            statistics |= {f"{epoch}/{name}": buffer.cpu().clone() for name, buffer in model.named_buffers()
                           if isinstance(model.get_submodule(name.rpartition(".")[0]), nn.modules.batchnorm._BatchNorm)}
        if update:
            save_tensors(tmp / BATCHNORM, statistics)
        for array in arrays.values():
            array.flush()
        if tmp is None:
            return  # process 0 writes the rest
        write_json(tmp / META, {
            "arch": params.model.arch, "weights": params.model.weights, "head": head.name,
            "classes": split["train"].classes, "feature_shape": list(feature_shape),
            "views": views, "batchnorm": recipe.batchnorm, "preprocess": pre.model_dump(),
            "samples": {name: [[Path(path).relative_to(args.data / name).as_posix(), label]
                               for path, label in split[name].samples] for name in ("train", "val")},
            "params_digest": params.digest(PARAMS),
        })
    seconds = time.perf_counter() - started
    images = stored * n_train + n_val * passes
    write_json(args.record, run_record(device, threads, workers, started, backbone_passes=images,
                                       images_per_second=round(images / seconds, 2), processes=world.size))
    print(f"features: {stored} view(s) of {n_train} train and {n_val} val images through {params.model.arch} "
          f"-> {args.out} ({seconds:.1f}s)")


def allocate(folder: Path, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Float32 ``.npy`` files in ``folder``, memory-mapped to be filled batch by batch, so a large
    data set's features never have to fit in memory at once.

    ``open_memmap`` makes sparse files: on a disk that fills up, a write into the mapping would
    kill the process with SIGBUS and no message. So a disk too small is refused before anything
    is computed, and each file is allocated in full before any page of it is written (mapping
    alone writes nothing), so that a disk filling up meanwhile is an ``OSError`` here."""
    need = sum(4 * math.prod(shape) for shape in shapes.values())
    free = shutil.disk_usage(folder).free
    if need > free:
        raise UserError(f"the features need about {need / 2**20:,.1f} MB, but {folder.parent} has "
                        f"{free / 2**20:,.1f} MB free: free some space there, or store fewer views "
                        "(train.feature_extract.views)")
    arrays = {}
    for name, shape in shapes.items():
        arrays[name] = np.lib.format.open_memmap(folder / name, mode="w+", dtype=np.float32, shape=shape)
        if hasattr(os, "posix_fallocate"):  # not on macOS: there the check above is all
            with open(folder / name, "r+b") as file:
                os.posix_fallocate(file.fileno(), 0, file.seek(0, os.SEEK_END))
    return arrays


if __name__ == "__main__":
    run_stage(main)
