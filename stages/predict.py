"""Classify new images with a trained model: ``python -m stages.predict --strategy lp_ft IMG_OR_DIR...``.

Not a stage but the pipeline's consumer: each image is decoded as every stage decodes and
preprocessed as validation was (from the checkpoint's sidecar). A path it cannot predict gets
one ``error:`` line and the rest are still predicted; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import stat
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import functional as F

from transfer.checkpoints import CheckpointMeta, read_meta, trained_classifier
from transfer.devices import resolve_device
from transfer.errors import UserError, say
from transfer.imagefolder import is_image_name, is_litter
from transfer.images import ImageTooLarge, decode
from transfer.params import load_params
from transfer.preprocess import ModelInput, val_crop
from transfer.stage import run_stage
from transfer.strategies import STRATEGIES


def load_image(path: Path) -> Image.Image:
    """The image as validation saw its data set's (:func:`transfer.images.decode`: upright,
    transparency on white, 16-bit scaled); a missing path, anything but a regular file (a named
    pipe would block the reader for ever), an unreadable or too large image is a UserError."""
    try:
        mode = path.stat().st_mode  # an empty folder given comes here too
    except FileNotFoundError:
        raise UserError(f"{path}: no such file or folder") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{path}: folder holds no images" if stat.S_ISDIR(mode) else
                        f"{path}: not a regular file (a pipe, device or socket); refused")
    try:
        return decode(path)
    except ImageTooLarge as exc:
        raise UserError(f"{path}: {exc}") from None
    except Exception as exc:  # PIL raises many types for unreadable files
        raise UserError(f"{path}: not a readable image ({exc.__class__.__name__})") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--strategy", choices=STRATEGIES, default="finetune")
    parser.add_argument("--model", type=Path, help="checkpoint to use; default: models/<strategy>.pt")
    parser.add_argument("--params", default="params.yaml", help="read for the device setting")
    parser.add_argument("--device", help="override the device param (auto, cpu, cuda, cuda:N, mps)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of lines")
    args = parser.parse_args(argv)

    device = resolve_device(args.device, "--device") if args.device else \
        resolve_device(load_params(args.params).device, args.params)
    path = args.model or Path(f"models/{args.strategy}.pt")
    meta = read_meta(path, CheckpointMeta)
    model, prepare = trained_classifier(path, meta, device), ModelInput(meta.preprocess, device)

    results, failures = [], 0
    for path in args.paths:
        # A folder stands for its images, at any depth; one without any stays itself, for
        # load_image to report.
        images = sorted(p for p in path.rglob("*") if is_image_name(p.name) and not is_litter(p.relative_to(path))
                        and not p.is_dir()) if path.is_dir() else []
        for item in images or [path]:
            try:
                batch = prepare(F.pil_to_tensor(val_crop(load_image(item), meta.preprocess))[None])
            except UserError as exc:
                say(f"error: {exc}")
                failures += 1
                continue
            with torch.inference_mode():
                probs = model(batch).float().softmax(dim=1)[0].cpu()
            best = meta.classes[probs.argmax()]  # of equal probabilities, the first
            scores = {c: round(float(p), 6) for c, p in zip(meta.classes, probs, strict=True)}
            result = {"path": str(item), "class": best, "confidence": scores[best], "probabilities": scores}
            results.append(result)
            if not args.json:
                print(f"{item}\t{result['class']}\t{result['confidence']:.4f}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    run_stage(main)
