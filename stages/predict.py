"""Classify new images with a trained model: ``python -m stages.predict --mode finetune IMG_OR_DIR...``.

Not a pipeline stage but its consumer: it loads ``models/<mode>.pt`` and preprocesses each
image exactly as validation did (from the checkpoint's sidecar), decoded as every stage
decodes (upright by EXIF orientation, transparency on white, 16-bit scaled). Folders are
searched recursively for images. A path that does not exist, is not an image or has more
pixels than Pillow's decompression-bomb check allows gets one ``error:`` line on stderr and
the rest are still predicted; the exit code is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from transfer.checkpoints import load_trained_model, preprocess_of
from transfer.devices import resolve_device
from transfer.errors import UserError, run_stage
from transfer.images import ImageTooLarge, decode
from transfer.layout import is_image_name, is_litter
from transfer.params import MODES, load_params
from transfer.preprocess import eval_transform


def expand(paths: list[Path]) -> list[Path | UserError]:
    """Files as given, folders replaced by their images; missing paths become errors."""
    found: list[Path | UserError] = []
    for path in paths:
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p.name)
                            and not is_litter(p.relative_to(path)))
            found.extend(images or [UserError(f"{path}: folder holds no images")])
        elif path.exists():
            found.append(path)
        else:
            found.append(UserError(f"{path}: no such file or folder"))
    return found


def load_image(path: Path) -> Image.Image:
    """The image as validation saw its data set's (:func:`transfer.images.decode`: upright,
    transparency on white, 16-bit scaled); an unreadable or too large file is a UserError."""
    try:
        return decode(path)
    except ImageTooLarge as exc:
        raise UserError(f"{path}: {exc}") from None
    except Exception as exc:  # PIL raises many types for unreadable files
        raise UserError(f"{path}: not a readable image ({exc.__class__.__name__})") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path, metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--mode", choices=MODES, default="finetune")
    parser.add_argument("--model", type=Path, help="checkpoint to use; default: models/<mode>.pt")
    parser.add_argument("--params", default="params.yaml", help="read for the device setting")
    parser.add_argument("--device", help="override the device param (auto, cpu, cuda, cuda:N, mps)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of lines")
    args = parser.parse_args(argv)

    device = resolve_device(args.device or load_params(args.params).device)
    model, meta = load_trained_model(args.model or Path(f"models/{args.mode}.pt"), device)
    transform = eval_transform(preprocess_of(meta))
    classes: list[str] = meta["classes"]

    results, failures = [], 0
    for item in expand(args.paths):
        try:
            if isinstance(item, UserError):
                raise item
            batch = transform(load_image(item)).unsqueeze(0).to(device)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failures += 1
            continue
        with torch.inference_mode():
            probs = model(batch).float().softmax(dim=1)[0].cpu()
        best = int(probs.argmax())
        result = {"path": str(item), "class": classes[best], "confidence": round(float(probs[best]), 6),
                  "probabilities": {c: round(float(p), 6) for c, p in zip(classes, probs, strict=True)}}
        results.append(result)
        if not args.json:
            print(f"{item}\t{result['class']}\t{result['confidence']:.4f}", flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    run_stage(main)
