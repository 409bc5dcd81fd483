"""Stage ``features``: the frozen backbone's outputs, computed once for ``train@feature_extract``.

Runs the pretrained backbone over the validation images and over ``views`` seeded augmented
views of every training image, and stores what the new head would receive (see
:mod:`transfer.features`). A change to the head's recipe (lr, momentum, weight decay, the
schedule) then retrains in seconds without running the backbone again. The run record
(timings, versions, device) goes to ``reports/features.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from transfer import distributed
from transfer.atomic import atomic_dir, write_json
from transfer.checkpoints import pretrained_classifier, read_pretrained_meta, save_tensors
from transfer.data import WORKER_START, EpochSampler, TrainImages, ValImages, image_folders, make_loader
from transfer.devices import resolve_device
from transfer.distributed import World
from transfer.errors import ParamError, UserError, run_stage
from transfer.features import (
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
from transfer.interrupts import quiet_loader_worker
from transfer.params import Params, load_params
from transfer.preprocess import ModelInput, resolve_preprocess
from transfer.reproducibility import configure_backends, seed_everything
from transfer.runtime import amp_warning, configure_threads, resolve_workers, run_record
from transfer.training import autocast


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, default=Path("data/hymenoptera_data"))
    parser.add_argument("--weights", type=Path, default=Path("models/pretrained.pt"))
    parser.add_argument("--out", type=Path, default=Path("data/features"))
    parser.add_argument("--record", type=Path, default=Path("reports/features.json"), help="run record")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    params = load_params(args.params)
    recipe = params.train.feature_extract
    update = recipe.batchnorm == "update"
    if update and recipe.views != "auto":
        raise ParamError("train.feature_extract.views", "must be auto with batchnorm: update (the BatchNorm "
                         f"statistics change with every epoch's batches), got {recipe.views}")
    asked = resolve_device(params.device)
    if update:  # the statistics follow one batch after another: one process computes them
        compute(args, params, distributed.current(), asked, configure_threads(params.runtime.threads), started)
        return
    # With train.distributed asking for several processes, each runs the backbone on its share
    # of the images and process 0 writes them all: the same file as from one process.
    settings = params.train.distributed
    distributed.check(settings, asked)
    threads = configure_threads(params.runtime.threads, processes=settings.nproc_per_node)
    distributed.run_processes(settings, asked, "stages.features", argv, threads=threads,
                              run=distributed.run_id("features", params.digest(PARAMS)),
                              work=lambda world, device: compute(args, params, world, device, threads, started))


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
    workers = resolve_workers(params.runtime.num_workers, device, params.train.distributed.nproc_per_node)
    seed_everything(params.seed)

    pretrained = read_pretrained_meta(args.weights, params.model)
    pre = resolve_preprocess(params.preprocess, pretrained["preprocess"])
    split = image_folders(args.data)
    model, head = pretrained_classifier(args.weights, pretrained, len(split["train"].classes), pre.crop)
    head_module = model.get_submodule(head.name)
    probe = torch.zeros(1, 3, pre.crop, pre.crop)
    if not head_is_last(model, head_module, probe):
        raise UserError(f"{params.model.arch} computes more after its classification head ({head.name}), so its "
                        "frozen backbone's outputs cannot be stored for feature_extract; train it with finetune")
    with torch.inference_mode(), head_inputs(head_module) as captured:
        model.eval()(probe)
    feature_shape = tuple(captured[0].shape[1:])
    model = model.to(device, memory_format=torch.channels_last)

    # Frozen: each image is decoded once and all its views made in a row, so nothing needs
    # caching. Update: every epoch goes over all images again, so they are decoded once and kept.
    budget = params.runtime.image_cache_mb * 2**20 if update else 0
    views = recipe.epochs if update else recipe.view_count()
    stored = max(views, 1)  # no augmentation still stores one view: the validation crop
    val = ValImages(split["val"], pre, cache_bytes=budget)
    val.images.fill("decode val")
    train = TrainImages(split["train"], pre, seed=params.seed, cache_bytes=budget - val.images.used, augment=views > 0)
    train.images.fill("decode train")

    writer = FeatureWriter()
    prepare = ModelInput(pre, device)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        """The head's input for a uint8 batch."""
        with head_inputs(head_module) as captured, torch.no_grad(), autocast(device, params.train.amp):
            model(prepare(pixels))
        return captured[0]

    # On the CPU the frozen backbone runs in loader worker processes, one thread each: on two
    # cores two single-threaded processes get through about 20% more images per second than
    # one process whose two threads wait for each other at every layer. Elsewhere the workers
    # prepare images and the backbone runs here (on the GPU; or updating its statistics).
    # The workers get ``forward``, a closure, so they must be forked (Linux): where processes
    # are spawned instead, the backbone runs here.
    forked = WORKER_START == "fork"
    processes = threads if device.type == "cpu" and not update and threads > 1 and forked else 0

    def run(dataset: Dataset, pairs: Sequence[tuple[int, int]], batch_size: int, name: str, desc: str) -> None:
        """The backbone over ``pairs`` of (view, image), in order; outputs into ``name``. Of
        several processes, each computes every ``world.size``-th batch and process 0 writes."""
        chunks = [pairs[start:start + batch_size] for start in range(0, len(pairs), batch_size)]
        mine = chunks[world.rank::world.size]
        if processes:
            batches: Iterable[tuple[Sequence[tuple[int, int]], torch.Tensor]] = DataLoader(
                BackboneOutputs(dataset, mine, forward), batch_size=None, num_workers=processes,
                worker_init_fn=quiet_loader_worker, multiprocessing_context=WORKER_START)
        else:
            loader = make_loader(dataset, [p for chunk in mine for p in chunk], batch_size=batch_size,  # type: ignore[arg-type]
                                 workers=workers, device=device)
            batches = ((chunk, forward(pixels).cpu()) for chunk, (pixels, _) in zip(mine, loader, strict=True))
        rounds = -(-len(chunks) // world.size)
        for chunk, outputs in tqdm(world.gather(iter(batches), rounds), desc=desc, total=len(chunks), unit="batch",
                                   leave=False, disable=None if world.main else True):
            keys = torch.tensor(chunk)
            writer.write(name, keys[:, 0], keys[:, 1], outputs)

    n_train, n_val = len(train), len(val)
    with atomic_dir(args.out) if world.main else contextlib.nullcontext(None) as tmp:
        if tmp is not None:
            writer.open(tmp, feature_shape, (stored, n_train), (recipe.epochs if update else 1, n_val))
        batch = params.runtime.inference_batch_size
        if not update:  # a fixed function of the image: every view of every image, once
            model.eval()
            run(train, [(v, i) for i in range(n_train) for v in range(stored)], batch, TRAIN,
                f"features: {stored} view(s) of {n_train} train images")
            run(val, [(0, i) for i in range(n_val)], batch, VAL, f"features: {n_val} val images")
        else:  # the statistics follow each epoch's training batches, exactly as training would draw them
            statistics: dict[str, torch.Tensor] = {}
            sampler = EpochSampler(n_train, seed=params.seed, shuffle=True, cycle=None)
            for epoch in range(1, recipe.epochs + 1):
                sampler.set_epoch(epoch)
                model.train()  # the tutorial's model.train(): BatchNorm uses and follows the batch statistics
                run(train, list(sampler), params.train.batch_size, TRAIN, f"features: epoch {epoch} train")
                model.eval()
                run(val, [(epoch - 1, i) for i in range(n_val)], batch, VAL, f"features: epoch {epoch} val")
                statistics |= {f"{epoch}/{k}": v for k, v in batchnorm_buffers(model).items()}
            save_tensors(tmp / BATCHNORM, statistics)
        writer.close()
        if tmp is None:
            return  # process 0 writes the rest
        relative = {name: [[Path(p).relative_to(args.data / name).as_posix(), label] for p, label in s.samples]
                    for name, s in split.items()}
        write_json(tmp / META, {
            "arch": params.model.arch, "weights": params.model.weights, "head": head.name,
            "classes": split["train"].classes, "feature_shape": list(feature_shape),
            "views": views, "batchnorm": recipe.batchnorm, "preprocess": dataclasses.asdict(pre),
            "samples": relative, "params_digest": params.digest(PARAMS),
        })
    seconds = time.perf_counter() - started
    images = stored * n_train + n_val * (recipe.epochs if update else 1)
    write_json(args.record, run_record(device, threads, processes or workers, wall_seconds=round(seconds, 2),
                                       backbone_passes=images, images_per_second=round(images / seconds, 2),
                                       processes=world.size))
    print(f"features: {stored} view(s) of {n_train} train and {n_val} val images through {params.model.arch} "
          f"-> {args.out} ({seconds:.1f}s)")


if __name__ == "__main__":
    run_stage(main)
