"""Stage ``preview``: one augmented training batch with its class names (``plots/train_batch.png``).

The tutorial shows this picture before training, to check that the data and the
augmentations look right. The batch is drawn with ``seed``, so reruns give the same picture.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from transfer.checkpoints import read_pretrained_meta
from transfer.data import build_transforms, load_image_folders, make_loader, resolve_preprocess
from transfer.errors import run_stage
from transfer.figures import save_image_grid
from transfer.params import load_params
from transfer.reproducibility import seed_everything


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, default=Path("data/hymenoptera_data"))
    parser.add_argument("--weights", type=Path, default=Path("models/pretrained.pt"),
                        help="the weights stage's output, whose sidecar holds the preprocessing")
    parser.add_argument("--out", type=Path, default=Path("plots/train_batch.png"))
    args = parser.parse_args(argv)

    params = load_params(args.params)
    generator = seed_everything(params.seed)
    pre = resolve_preprocess(params.preprocess, read_pretrained_meta(args.weights, params.model)["preprocess"])
    train = load_image_folders(args.data, {"train": build_transforms(pre)["train"]})["train"]
    loader = make_loader(train, batch_size=params.train.batch_size, shuffle=True, workers=0,
                         generator=generator, device=torch.device("cpu"))
    inputs, labels = next(iter(loader))
    save_image_grid(args.out, list(inputs), [train.classes[i] for i in labels.tolist()],
                    mean=pre.mean, std=pre.std,
                    suptitle="one augmented training batch")
    print(f"preview: {len(inputs)} training images -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
