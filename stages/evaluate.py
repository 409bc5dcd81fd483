"""Stage ``evaluate@<mode>``: score the best checkpoint on the validation split and plot it.

Loads ``models/<mode>.pt`` (``weights_only=True``) with the preprocessing recorded in its
sidecar, runs the validation images once in a fixed order, and writes:

- ``metrics/<mode>.json``: the numbers people compare across runs: accuracy with its 95%
  Wilson interval (``ci95_low``/``ci95_high``), mean loss, macro F1, the checkpoint's epoch
  and the number of images;
- ``plots/<mode>/predictions.csv``: path, actual, predicted, confidence per image (the shape
  DVC's ``confusion`` template reads);
- ``plots/<mode>/classes.csv``: precision, recall, F1 and support per class;
- ``plots/<mode>/predictions.png``: a seeded sample of images titled with predicted and true
  class, mistakes in red (the tutorial's ``visualize_model``);
- ``plots/<mode>/mistakes.png``: the most confident mistakes, where users learn most;
- ``reports/<mode>/evaluate.json``: the run record (device, versions, timings).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import pandas as pd
import torch

from transfer.atomic import write_json, write_text
from transfer.checkpoints import load_trained_model, preprocess_of
from transfer.data import ValImages, image_folders, make_loader
from transfer.devices import resolve_device
from transfer.errors import UserError, run_stage
from transfer.evaluation import Predictions, classification_report, predict, wilson_interval
from transfer.figures import save_image_grid
from transfer.params import MODES, load_params
from transfer.preprocess import ModelInput
from transfer.runtime import configure_threads, resolve_workers, run_record

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
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, default=Path("data/hymenoptera_data"))
    parser.add_argument("--model", type=Path, help="default: models/<mode>.pt")
    parser.add_argument("--metrics", type=Path, help="default: metrics/<mode>.json")
    parser.add_argument("--plots", type=Path, help="folder for predictions.csv/.png, classes.csv and mistakes.png; "
                        "default: plots/<mode>")
    parser.add_argument("--record", type=Path, help="run record; default: reports/<mode>/evaluate.json")
    args = parser.parse_args(argv)
    mode: str = args.mode
    plots = args.plots or Path(f"plots/{mode}")

    started = time.perf_counter()
    params = load_params(args.params)
    device = resolve_device(params.device)
    threads = configure_threads(params.runtime.threads)
    workers = resolve_workers(params.runtime.num_workers, device)
    model, meta = load_trained_model(args.model or Path(f"models/{mode}.pt"), device)
    model = model.to(memory_format=torch.channels_last)
    pre = preprocess_of(meta)
    split = image_folders(args.data)["val"]
    if split.classes != meta["classes"]:
        raise UserError(f"{args.data}/val has classes {split.classes}, but the model was trained on "
                        f"{meta['classes']}: retrain it (`dvc repro`)")
    dataset = ValImages(split, pre, cache_bytes=params.runtime.image_cache_mb * 2**20)
    loader = make_loader(dataset, [(0, i) for i in range(len(dataset))],  # type: ignore[arg-type]
                         batch_size=params.runtime.inference_batch_size, workers=workers, device=device)
    preds = predict(model, loader, device, ModelInput(pre, device), desc=f"evaluate@{mode}")
    classes: list[str] = meta["classes"]

    report = classification_report(preds.labels, preds.predicted, classes)
    correct = int((preds.predicted == preds.labels).sum())
    low, high = wilson_interval(correct, len(split))
    write_json(args.metrics or Path(f"metrics/{mode}.json"), {
        "accuracy": report["accuracy"], "ci95_low": low, "ci95_high": high, "loss": preds.mean_loss,
        "macro_f1": report["macro"]["f1"], "best_epoch": meta["epoch"], "images": report["images"],  # type: ignore[index]
    })
    paths = [Path(p).relative_to(args.data).as_posix() for p in split.paths]
    write_text(plots / "predictions.csv", predictions_csv(paths, preds, classes))
    write_text(plots / "classes.csv", classes_csv(report["per_class"]))  # type: ignore[arg-type]

    wrong = (preds.predicted != preds.labels).tolist()
    count = min(params.evaluate.grid_images, len(dataset))
    sample = sorted(random.Random(params.seed).sample(range(len(dataset)), count))
    confident_mistakes = sorted((i for i in range(len(dataset)) if wrong[i]),
                                key=lambda i: -preds.confidence[i].item())[:params.evaluate.grid_images]

    def grid(indices: list[int], name: str, title: str) -> None:
        save_image_grid(
            plots / name, [dataset[(0, i)][0] for i in indices],
            [f"predicted: {classes[preds.predicted[i]]} ({preds.confidence[i]:.0%})\n"
             f"actual: {classes[preds.labels[i]]}" for i in indices],
            mistakes=[wrong[i] for i in indices], suptitle=title,
        )

    grid(sample, "predictions.png", f"{mode}: validation predictions (mistakes in red)")
    grid(confident_mistakes, "mistakes.png", f"{mode}: most confident mistakes "
         f"({sum(wrong)} of {len(dataset)} wrong)")
    seconds = time.perf_counter() - started
    write_json(args.record or Path(f"reports/{mode}/evaluate.json"), run_record(
        device, threads, workers, wall_seconds=round(seconds, 2), images=len(dataset)))
    print(f"evaluate@{mode}: accuracy {report['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}) on "
          f"{report['images']} images, loss {preds.mean_loss:.4f}, macro F1 {report['macro']['f1']:.4f}")  # type: ignore[index]


if __name__ == "__main__":
    run_stage(main)
