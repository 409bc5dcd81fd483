"""Stage ``preview``: the first augmented training batch with its classes, the picture the
tutorial shows before training; it is exactly the first batch fine-tuning trains on.
"""

from __future__ import annotations

from pathlib import Path

from transfer.checkpoints import PretrainedMeta, read_start
from transfer.datasets import EpochSampler, TrainImages
from transfer.figures import save_image_grid
from transfer.imagefolder import image_folders
from transfer.params import load_params
from transfer.preprocess import resolve_preprocess
from transfer.stage import run_stage, stage_parser

#: The params this stage reads that can change its output, as dvc.yaml declares them.
PARAMS = ("seed", "model", "preprocess", "train.batch_size")


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--data", type=Path, default="data/hymenoptera_data")
    parser.add_argument("--weights", type=Path, default="models/pretrained.pt",
                        help="the weights stage's output, whose sidecar holds the preprocessing")
    parser.add_argument("--out", type=Path, default="plots/train_batch.png")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    meta = read_start(args.weights, PretrainedMeta, params.model)
    pre = resolve_preprocess(params.preprocess, meta.preprocess, args.params)
    split = image_folders(args.data)["train"]
    train = TrainImages(split, pre, seed=params.seed, cache_bytes=0)
    batch = [train[key] for key in list(EpochSampler(len(train), seed=params.seed, shuffle=True, cycle=None))
             [:params.train.batch_size]]
    save_image_grid(args.out, [image for image, _ in batch], [split.classes[label] for _, label in batch],
                    suptitle="the first augmented training batch")
    print(f"preview: {len(batch)} training images -> {args.out}")


if __name__ == "__main__":
    run_stage(main)
