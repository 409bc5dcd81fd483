"""Stage ``evaluate@<strategy>``: score the best checkpoint on the test split where the data set
has one, else on the validation split (which chose the checkpoint's epoch, so its score is
optimistic), with the preprocessing its sidecar records; metrics, predictions and pictures
(docs/comparing.md).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import pandas as pd
import torch

from transfer.atomic import write_json, write_text
from transfer.checkpoints import CheckpointMeta, read_meta, trained_classifier
from transfer.datasets import ValImages, ordered_loader
from transfer.devices import configure_threads, resolve_device, resolve_workers
from transfer.errors import UserError
from transfer.evaluation import classification_report, predict
from transfer.figures import save_image_grid
from transfer.imagefolder import image_folders
from transfer.params import load_params
from transfer.preprocess import ModelInput
from transfer.record import run_record
from transfer.stage import run_stage, stage_parser
from transfer.statistics import wilson_interval

#: The params this stage reads that can change its outputs, as dvc.yaml declares them.
PARAMS = ("seed", "device", "evaluate")


def main(argv: list[str] | None = None) -> None:
    parser = stage_parser(__doc__, data="the image folders", model="the checkpoint", metrics=None,
                          plots="folder for predictions.csv, classes.csv, predictions.png and mistakes.png",
                          record="run record (timings, versions, device)")
    parser.add_argument("--strategy", required=True, help="the strategy's name, for titles and lines")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    params = load_params(args.params)
    device = resolve_device(params.device, args.params)
    threads = configure_threads(params.runtime.threads)
    workers = resolve_workers(params.runtime.num_workers, device)
    meta = read_meta(args.model, CheckpointMeta)
    model = trained_classifier(args.model, meta, device)
    folders = image_folders(args.data)
    scored = "test" if "test" in folders else "val"
    split, classes = folders[scored], meta.classes
    if split.classes != classes:
        raise UserError(f"{args.data}/{scored} has classes {split.classes}, but the model was trained on "
                        f"{classes}: retrain it (`dvc repro`)")
    dataset = ValImages(split, meta.preprocess, cache_bytes=params.runtime.image_cache_mb * 2**20)
    loader = ordered_loader(dataset, [(0, i) for i in range(len(dataset))],
                            batch_size=params.runtime.inference_batch_size, workers=workers, device=device)
    preds = predict(model.to(memory_format=torch.channels_last), loader, device, ModelInput(meta.preprocess, device),
                    f"evaluate@{args.strategy}")
    if not math.isfinite(preds.mean_loss):
        raise UserError(f"{args.model} gives a loss of {preds.mean_loss} on {args.data}/{scored}: its weights are "
                        f"damaged; retrain it (`dvc repro --force train@{args.strategy}`)")

    # The metrics (held_out: scored on images that neither trained nor chose the epoch), each
    # image's prediction and the scores per class; and the line that sums them up.
    report = classification_report(preds.labels, preds.predicted, classes)
    actual, predicted = ([classes[i] for i in t.tolist()] for t in (preds.labels, preds.predicted))
    confidence, wrong = preds.confidence.tolist(), (preds.predicted != preds.labels).tolist()
    images = len(wrong)
    low, high = wilson_interval(images - sum(wrong), images)
    write_json(args.metrics, {
        "accuracy": report.accuracy, "ci95_low": low, "ci95_high": high, "loss": preds.mean_loss,
        "macro_f1": report.macro["f1"], "best_epoch": meta.epoch, "images": images,
        "split": scored, "held_out": scored == "test",
    })
    for file, table in (
            ("predictions.csv", pd.DataFrame({"path": [Path(p).relative_to(args.data).as_posix() for p in split.paths],
                                              "actual": actual, "predicted": predicted, "confidence": confidence})),
            ("classes.csv", pd.DataFrame.from_dict(report.per_class, orient="index").rename_axis("class")
             .reset_index())):
        write_text(args.plots / file, table.to_csv(index=False, lineterminator="\n", float_format="%.6f"))
    print(f"evaluate@{args.strategy}: accuracy {report.accuracy:.4f} (95% CI {low:.4f}-{high:.4f}) on "
          f"{images} {scored} images, loss {preds.mean_loss:.4f}, macro F1 {report.macro['f1']:.4f}")

    # A seeded sample of images with their predictions (the tutorial's visualize_model), and the
    # most confident mistakes, where users learn most.
    count = params.evaluate.grid_images
    sample = sorted(random.Random(params.seed).sample(range(images), min(count, images)))
    mistakes = sorted((i for i in range(images) if wrong[i]), key=lambda i: -confidence[i])[:count]
    for indices, file, title in (
            (sample, "predictions.png", f"{'validation' if scored == 'val' else scored} predictions (mistakes in red)"),
            (mistakes, "mistakes.png", f"most confident mistakes ({sum(wrong)} of {images} wrong)")):
        save_image_grid(args.plots / file, [dataset[0, i][0] for i in indices],
                        [f"predicted: {predicted[i]} ({confidence[i]:.0%})\nactual: {actual[i]}" for i in indices],
                        mistakes=[wrong[i] for i in indices], suptitle=f"{args.strategy}: {title}")
    write_json(args.record, run_record(device, threads, workers, started, images=images))


if __name__ == "__main__":
    run_stage(main)
