"""Stage ``evaluate@<mode>``: score the best checkpoint on the validation split and plot it.

Loads ``models/<mode>.pt`` (``weights_only=True``) with the preprocessing recorded in its
sidecar, runs the validation images once in a fixed order, and writes:

- ``metrics/<mode>/eval.json``: accuracy, mean loss, per-class precision/recall/F1/support,
  macro averages, number of images, device;
- ``plots/<mode>/predictions.csv``: path, actual, predicted, confidence per image (the shape
  DVC's ``confusion`` template reads);
- ``plots/<mode>/predictions.png``: a seeded sample of images titled with predicted and true
  class, mistakes in red (the tutorial's ``visualize_model``);
- ``plots/<mode>/mistakes.png``: the most confident mistakes, where users learn most.
"""

from __future__ import annotations

import argparse
import csv
import io
import random
from pathlib import Path

from transfer.atomic import write_json, write_text
from transfer.checkpoints import load_trained_model, preprocess_of
from transfer.data import eval_transform, load_image_folders, make_loader, resolve_workers
from transfer.devices import describe_device, resolve_device
from transfer.errors import UserError, run_stage
from transfer.evaluation import Predictions, classification_report, predict
from transfer.figures import save_image_grid
from transfer.params import MODES, load_params


def predictions_csv(paths: list[str], preds: Predictions, classes: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", "actual", "predicted", "confidence"])
    for path, label, guess, conf in zip(paths, preds.labels.tolist(), preds.predicted.tolist(),
                                        preds.confidence.tolist(), strict=True):
        writer.writerow([path, classes[label], classes[guess], f"{conf:.6f}"])
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", type=Path, default=Path("data/hymenoptera_data"))
    parser.add_argument("--model", type=Path, help="default: models/<mode>.pt")
    parser.add_argument("--metrics", type=Path, help="default: metrics/<mode>/eval.json")
    parser.add_argument("--plots", type=Path, help="folder for predictions.csv/.png and mistakes.png; "
                        "default: plots/<mode>")
    args = parser.parse_args(argv)
    mode: str = args.mode
    plots = args.plots or Path(f"plots/{mode}")

    params = load_params(args.params)
    device = resolve_device(params.device)
    model, meta = load_trained_model(args.model or Path(f"models/{mode}.pt"), device)
    pre = preprocess_of(meta)
    dataset = load_image_folders(args.data, {"val": eval_transform(pre)})["val"]
    if dataset.classes != meta["classes"]:
        raise UserError(f"{args.data}/val has classes {dataset.classes}, but the model was trained on "
                        f"{meta['classes']}: retrain it (`dvc repro`)")
    loader = make_loader(dataset, batch_size=params.evaluate.batch_size, shuffle=False,
                         workers=resolve_workers(params.train.num_workers), generator=None, device=device)
    preds = predict(model, loader, device, desc=f"evaluate@{mode}")
    classes: list[str] = meta["classes"]

    report = classification_report(preds.labels, preds.predicted, classes)
    write_json(args.metrics or Path(f"metrics/{mode}/eval.json"), {
        **report, "loss": preds.mean_loss, "device": describe_device(device),
        "checkpoint_epoch": meta["epoch"],
    })
    paths = [Path(p).relative_to(args.data).as_posix() for p, _ in dataset.samples]
    write_text(plots / "predictions.csv", predictions_csv(paths, preds, classes))

    wrong = (preds.predicted != preds.labels).tolist()
    count = min(params.evaluate.grid_images, len(dataset))
    sample = sorted(random.Random(params.seed).sample(range(len(dataset)), count))
    confident_mistakes = sorted((i for i in range(len(dataset)) if wrong[i]),
                                key=lambda i: -preds.confidence[i].item())[:params.evaluate.grid_images]

    def grid(indices: list[int], name: str, title: str) -> None:
        save_image_grid(
            plots / name, [dataset[i][0] for i in indices],
            [f"predicted: {classes[preds.predicted[i]]} ({preds.confidence[i]:.0%})\n"
             f"actual: {classes[preds.labels[i]]}" for i in indices],
            mean=pre.mean, std=pre.std, mistakes=[wrong[i] for i in indices], suptitle=title,
        )

    grid(sample, "predictions.png", f"{mode}: validation predictions (mistakes in red)")
    grid(confident_mistakes, "mistakes.png", f"{mode}: most confident mistakes "
         f"({sum(wrong)} of {len(dataset)} wrong)")
    print(f"evaluate@{mode}: accuracy {report['accuracy']:.4f} on {report['images']} images, "
          f"loss {preds.mean_loss:.4f}, macro F1 {report['macro']['f1']:.4f}")  # type: ignore[index]


if __name__ == "__main__":
    run_stage(main)
