"""The GPU check: what only a GPU can show, in one run of a few minutes (docs/platforms.md).

On the real data (``--zip``), in this process after one start-up, with the stages' own code:

1. finetune and feature_extract at 25 epochs, ``train.amp`` off and on: seconds per stage,
   training images per second and peak GPU memory, from the stages' run records;
2. one fine-tuning epoch under ``torch.cuda.set_sync_debug_mode("warn")``: every place that
   makes the host wait for the GPU, counted; a per-batch sync would show once per step;
3. a ``device: cuda:0`` run in a process of its own, watched with ``nvidia-smi``: it must
   open no context on another GPU.

``--smoke`` runs the same code on the CPU on generated data in seconds (1 and 2 epochs), the
GPU-only checks reported as skipped; the tests run it so that the script works when a GPU
machine is at hand.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import stages.features  # noqa: E402
import stages.train  # noqa: E402
import stages.unzip  # noqa: E402
import stages.weights  # noqa: E402
from transfer.stage import run_stage  # noqa: E402

STRATEGIES = ("finetune", "feature_extract")


def params_file(path: Path, changes: dict[str, Any]) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[last] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def stage(main: Any, argv: list[str]) -> None:
    try:
        run_stage(main, argv)
    except SystemExit as exc:
        if exc.code:
            raise SystemExit(f"{main.__module__} {' '.join(argv)} failed ({exc.code})") from None


def train(work: Path, data: Path, params: Path, name: str) -> dict[str, Any]:
    """The features stage and both train stages; what their run records say."""
    out, weights = work / name, work / "pretrained.pt"
    stage(stages.features.main, ["--params", str(params), "--data", str(data), "--weights", str(weights),
                                 "--out", str(out / "features"), "--record", str(out / "features.json")])
    records = {"features": json.loads((out / "features.json").read_text())}
    for strategy in STRATEGIES:
        inputs = data if strategy == "finetune" else out / "features"
        stage(stages.train.main, ["--strategy", strategy, "--params", str(params), "--inputs", str(inputs),
                                  "--weights", str(weights), "--model-out", str(out / f"{strategy}.pt"),
                                  "--history", str(out / strategy / "history.csv"),
                                  "--record", str(out / strategy / "train.json")])
        records[strategy] = json.loads((out / strategy / "train.json").read_text())
    keys = ("wall_seconds", "train_images_per_second", "images_per_second", "peak_gpu_memory_mib", "best_val_acc")
    return {name: {k: record[k] for k in keys if k in record} for name, record in records.items()}


def syncs(work: Path, data: Path, params: Path) -> dict[str, Any]:
    """One fine-tuning epoch with CUDA's sync debug mode on: each sync's source line, counted."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA"}
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(work, data, params, "sync-debug")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    places = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return {"syncs": sum(places.values()), "by_place": dict(places.most_common(10))}


def contexts(work: Path, data: Path, params: Path) -> dict[str, Any]:
    """A cuda:0 run in a process of its own, and the GPUs nvidia-smi sees it on."""
    if torch.cuda.device_count() < 2 or not shutil.which("nvidia-smi"):
        return {"skipped": f"{torch.cuda.device_count()} GPU(s): another GPU is needed to see a stray context"}
    argv = [sys.executable, "-m", "stages.train", "--strategy", "finetune", "--params", str(params), "--inputs",
            str(data), "--weights", str(work / "pretrained.pt"), "--model-out", str(work / "ctx" / "m.pt"),
            "--history", str(work / "ctx" / "h.csv"), "--record", str(work / "ctx" / "r.json")]
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL)
    seen: set[str] = set()
    while process.poll() is None:
        query = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_bus_id", "--format=csv,noheader"],
                               capture_output=True, text=True, check=False).stdout
        seen |= {bus.strip() for pid, bus in (line.split(",") for line in query.splitlines()) if
                 int(pid) == process.pid}
        time.sleep(0.5)
    return {"gpus_used": sorted(seen), "stray": len(seen) > 1}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=REPO.parent / "shared" / "data" / "hymenoptera_data.zip")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--smoke", action="store_true", help="the CPU, generated data, 1 epoch: the code paths only")
    parser.add_argument("--out", type=Path, help="where the results go as JSON")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        zip_path, epochs, base = args.zip, args.epochs, {"device": "cuda:0", "model.weights": "none"}
        if args.smoke:
            from conftest import make_dataset_zip

            zip_path, epochs = make_dataset_zip(work / "data.zip", n_train=5, n_val=3), 1
            base = {"device": "cpu", "model.weights": "none", "preprocess.resize": 40, "preprocess.crop": 32,
                    "runtime.threads": 1}
        stage(stages.unzip.main, [str(zip_path), "--out", str(work / "data"), "--report", str(work / "data.json"),
                                  "--params", str(params_file(work / "p.yaml", base))])
        stage(stages.weights.main, ["--params", str(work / "p.yaml"), "--out", str(work / "pretrained.pt")])
        results: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                                   "torch": torch.__version__}
        for amp in (False, True):
            params = params_file(work / f"amp-{amp}.yaml", {**base, "train.amp": amp,
                                                             **{f"train.{s}.epochs": epochs for s in STRATEGIES}})
            results[f"amp={amp}"] = train(work, work / "data", params, f"amp-{amp}")
        one_epoch = params_file(work / "one.yaml", {**base, **{f"train.{s}.epochs": 1 for s in STRATEGIES}})
        results["sync_debug"] = syncs(work, work / "data", one_epoch)
        results["contexts"] = contexts(work, work / "data", one_epoch)
        print(json.dumps(results, indent=2))
        if args.out:
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
