"""Stage ``train@<mode>``: transfer-learn the backbone on the image folders, one of two ways.

- ``finetune``: start from the pretrained weights, replace the final layer with one sized to
  the number of classes, and train every parameter.
- ``feature_extract``: freeze the backbone ("ConvNet as fixed feature extractor") and train
  only the new final layer; ``train.feature_extract.batchnorm`` says whether the frozen
  BatchNorm statistics stay fixed (``frozen``) or drift as in the tutorial (``update``).

Writes the best epoch's weights (``models/<mode>.pt`` + ``.json``), one history row per
epoch (``plots/<mode>/history.csv``) and a summary (``metrics/<mode>/train.json``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import time
from pathlib import Path

import torch
from torch import nn, optim
from torch.optim import lr_scheduler

from transfer.atomic import write_json, write_text
from transfer.checkpoints import read_pretrained_meta, save_checkpoint
from transfer.data import build_transforms, load_image_folders, make_loader, resolve_preprocess, resolve_workers
from transfer.devices import describe_device, resolve_device
from transfer.errors import run_stage
from transfer.models import check_input_size, create_backbone, freeze_backbone, load_backbone_state, replace_head
from transfer.params import MODES, load_params
from transfer.reproducibility import configure_backends, seed_everything
from transfer.training import EpochRecord, train_model


def history_csv(history: list[EpochRecord]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(history[0].as_row()), lineterminator="\n")
    writer.writeheader()
    for record in history:
        writer.writerow({k: round(v, 6) if isinstance(v, float) else v for k, v in record.as_row().items()})
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, default=Path("data/hymenoptera_data"))
    parser.add_argument("--weights", type=Path, default=Path("models/pretrained.pt"))
    parser.add_argument("--model-out", type=Path, help="default: models/<mode>.pt")
    parser.add_argument("--history", type=Path, help="default: plots/<mode>/history.csv")
    parser.add_argument("--metrics", type=Path, help="default: metrics/<mode>/train.json")
    args = parser.parse_args(argv)
    mode: str = args.mode
    model_out = args.model_out or Path(f"models/{mode}.pt")
    history_out = args.history or Path(f"plots/{mode}/history.csv")
    metrics_out = args.metrics or Path(f"metrics/{mode}/train.json")

    params = load_params(args.params)
    recipe = params.train.mode(mode)
    device = resolve_device(params.device)
    configure_backends(device, params.train.deterministic)
    generator = seed_everything(params.seed)

    pretrained = read_pretrained_meta(args.weights, params.model)
    preprocess = resolve_preprocess(params.preprocess, pretrained["preprocess"])
    images = load_image_folders(args.data, build_transforms(preprocess))
    classes = images["train"].classes
    workers = resolve_workers(params.train.num_workers)
    loaders = {  # validation order does not change its metrics: keep it fixed, spend no randomness
        split: make_loader(images[split], batch_size=params.train.batch_size, shuffle=split == "train",
                           workers=workers, generator=generator, device=device)
        for split in ("train", "val")
    }

    model = create_backbone(params.model.arch)
    if pretrained["pretrained"]:  # otherwise `none`: keep the seeded random initialisation
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        load_backbone_state(model, state, str(args.weights))
    head = replace_head(model, len(classes))
    check_input_size(model, preprocess.crop)

    if mode == "feature_extract":
        trained_params = freeze_backbone(model, head)
    else:
        trained_params = list(model.parameters())
    frozen_bn = mode == "feature_extract" and params.train.feature_extract.batchnorm == "frozen"
    model = model.to(device)

    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(trained_params, lr=recipe.lr, momentum=recipe.momentum,
                          weight_decay=recipe.weight_decay)
    scheduler = lr_scheduler.StepLR(optimizer, step_size=recipe.step_size, gamma=recipe.gamma)

    print(f"train@{mode}: {params.model.arch} ({pretrained['source']}), {len(classes)} classes "
          f"{classes}, {len(images['train'])} train / {len(images['val'])} val images, "
          f"{sum(p.numel() for p in trained_params):,} trainable parameters, {describe_device(device)}")
    started = time.perf_counter()
    result = train_model(
        model, loaders, criterion, optimizer, scheduler, recipe.epochs, device,
        train_only=model.get_submodule(head.name) if frozen_bn else None, amp=params.train.amp,
    )
    wall = time.perf_counter() - started

    last = result.history[-1]
    save_checkpoint(model_out, result.best_state, {
        "mode": mode,
        "arch": params.model.arch,
        "classes": classes,
        "head": head.name,
        "epoch": result.best_epoch,
        "val_acc": result.best_acc,
        "weights": params.model.weights,
        "weights_source": pretrained["source"],
        "weights_sha256": pretrained.get("sha256"),
        "preprocess": dataclasses.asdict(preprocess),
        "params_digest": params.digest(),
    })
    write_text(history_out, history_csv(result.history))
    write_json(metrics_out, {
        "best_val_acc": result.best_acc,
        "best_epoch": result.best_epoch,
        "epochs": len(result.history),
        "final_train_loss": last.train_loss,
        "final_train_acc": last.train_acc,
        "final_val_loss": last.val_loss,
        "final_val_acc": last.val_acc,
        "wall_seconds": round(wall, 2),
        "train_images_per_second": round(
            len(result.history) / sum(1 / r.train_images_per_second for r in result.history), 2),
        "device": describe_device(device),
        "torch_version": torch.__version__,
    })
    print(f"train@{mode}: best val acc {result.best_acc:.4f} at epoch {result.best_epoch}, "
          f"{wall:.1f}s -> {model_out}")


if __name__ == "__main__":
    run_stage(main)
