"""Stage ``evaluate@<strategy>``: score the best checkpoint on the test split where the data set
has one, else on the validation split (which chose the checkpoint's epoch, so its score is
optimistic), with the preprocessing its sidecar records; metrics, predictions and pictures
(docs/comparing.md).
"""

from __future__ import annotations

import argparse
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
from transfer.evaluation import Predictions, classification_report, predict
from transfer.figures import save_image_grid
from transfer.imagefolder import image_folders
from transfer.params import load_params
from transfer.preprocess import ModelInput
from transfer.record import run_record
from transfer.stage import run_stage
from transfer.statistics import wilson_interval

#: The params this stage reads that can change its outputs, as dvc.yaml declares them.
PARAMS = ("seed", "device", "evaluate")


def predictions_csv(paths: list[str], preds: Predictions, classes: list[str]) -> str:
    table = pd.DataFrame({
        "path": paths,
        "actual": [classes[i] for i in preds.labels.tolist()],
        "predicted": [classes[i] for i in preds.predicted.tolist()],
        "confidence": preds.confidence.tolist(),
    })
    return table.to_csv(index=False, lineterminator="\n", float_format="%.6f")


def classes_csv(per_class: dict[str, dict[str, float]]) -> str:
    table = pd.DataFrame.from_dict(per_class, orient="index").rename_axis("class").reset_index()
    return table.to_csv(index=False, lineterminator="\n", float_format="%.6f")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", required=True, help="the strategy's name, for titles and lines")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, required=True, help="the image folders")
    parser.add_argument("--model", type=Path, required=True, help="the checkpoint")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--plots", type=Path, required=True, help="folder for predictions.csv, classes.csv, "
                        "predictions.png and mistakes.png")
    parser.add_argument("--record", type=Path, required=True, help="run record (timings, versions, device)")
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
    split = folders[scored]
    if split.classes != meta.classes:
        raise UserError(f"{args.data}/{scored} has classes {split.classes}, but the model was trained on "
                        f"{meta.classes}: retrain it (`dvc repro`)")
    dataset = ValImages(split, meta.preprocess, cache_bytes=params.runtime.image_cache_mb * 2**20)
    loader = ordered_loader(dataset, [(0, i) for i in range(len(dataset))],
                            batch_size=params.runtime.inference_batch_size, workers=workers, device=device)
    preds = predict(model.to(memory_format=torch.channels_last), loader, device, ModelInput(meta.preprocess, device),
                    desc=f"evaluate@{args.strategy}")
    if not math.isfinite(preds.mean_loss):
        raise UserError(f"{args.model} gives a loss of {preds.mean_loss} on {args.data}/{scored}: its weights are "
                        f"damaged; retrain it (`dvc repro --force train@{args.strategy}`)")
    write_scores(args, preds, meta.classes, meta.epoch, scored, [Path(p).relative_to(args.data) for p in split.paths])
    draw(args.plots, args.strategy, dataset, preds, meta.classes, params.evaluate.grid_images, params.seed, scored)
    write_json(args.record, run_record(device, threads, workers, wall_seconds=round(time.perf_counter() - started, 2),
                                       images=len(dataset)))


def write_scores(args: argparse.Namespace, preds: Predictions, classes: list[str], epoch: int, scored: str,
                 paths: list[Path]) -> None:
    """The metrics (``held_out``: scored on images that neither trained nor chose the epoch),
    each image's prediction and the scores per class; and the line that sums them up."""
    report = classification_report(preds.labels, preds.predicted, classes)
    low, high = wilson_interval(int((preds.predicted == preds.labels).sum()), report.images)
    write_json(args.metrics, {
        "accuracy": report.accuracy, "ci95_low": low, "ci95_high": high, "loss": preds.mean_loss,
        "macro_f1": report.macro["f1"], "best_epoch": epoch, "images": report.images,
        "split": scored, "held_out": scored == "test",
    })
    write_text(args.plots / "predictions.csv", predictions_csv([p.as_posix() for p in paths], preds, classes))
    write_text(args.plots / "classes.csv", classes_csv(report.per_class))
    print(f"evaluate@{args.strategy}: accuracy {report.accuracy:.4f} (95% CI {low:.4f}-{high:.4f}) on "
          f"{report.images} {scored} images, loss {preds.mean_loss:.4f}, macro F1 {report.macro['f1']:.4f}")


def draw(folder: Path, name: str, dataset: ValImages, preds: Predictions, classes: list[str], count: int, seed: int,
         scored: str) -> None:
    """A seeded sample of images with their predictions (the tutorial's ``visualize_model``),
    and the most confident mistakes, where users learn most."""
    wrong = (preds.predicted != preds.labels).tolist()
    sample = sorted(random.Random(seed).sample(range(len(dataset)), min(count, len(dataset))))
    mistakes = sorted((i for i in range(len(dataset)) if wrong[i]), key=lambda i: -preds.confidence[i].item())[:count]
    for indices, file, title in (
            (sample, "predictions.png", f"{'validation' if scored == 'val' else scored} predictions (mistakes in red)"),
            (mistakes, "mistakes.png", f"most confident mistakes ({sum(wrong)} of {len(dataset)} wrong)")):
        save_image_grid(folder / file, [dataset[(0, i)][0] for i in indices],
                        [f"predicted: {classes[preds.predicted[i]]} ({preds.confidence[i]:.0%})\n"
                         f"actual: {classes[preds.labels[i]]}" for i in indices],
                        mistakes=[wrong[i] for i in indices], suptitle=f"{name}: {title}")


if __name__ == "__main__":
    run_stage(main)
