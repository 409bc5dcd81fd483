"""Speed benchmark: the project's train stages against the tutorial's loop, in one invocation.

Why one invocation: timings on a shared or thermally throttled machine drift by tens of
percent over an hour, so the reference loop and the project run interleaved (reference,
project, reference, project, ... for each mode) and every figure is a median over
``--repeats`` runs; a ratio measured an hour apart would mostly measure the drift.

What is timed on the project side is what a user pays: the wall time of ``dvc repro
train@<mode>`` in a throw-away git copy of the project, with the stages' own run records
(``reports/...json``) for the inside view. The reference side is
``../shared/bench/tutorial_baseline.py`` (the tutorial's loop, unchanged), timed from the
outside the same way. See benchmarks/README.md for the figures and the scenarios.

usage: .venv/bin/python benchmarks/speed.py [--epochs 10] [--repeats 1] [--views 0]
       [--busy] [--scale 20] [--subset N] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
from data_sets import count_images, extract, scaled_zip, subset_zip
from runs import (
    OPENMP_WAIT_VARS,
    BenchmarkError,
    Measured,
    ProjectCopy,
    check,
    end_all,
    environment,
    git_state,
    interrupts_end_children,
    run_measured,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_ZIP = REPO.parent / "shared" / "data" / "hymenoptera_data.zip"
DEFAULT_BASELINE = REPO.parent / "shared" / "bench" / "tutorial_baseline.py"
MODES = ("finetune", "feature_extract")
#: The issue's targets for project/reference whole-run wall time (set at 10 epochs).
TARGETS = {"finetune": 0.5, "feature_extract": 0.3}
TARGET_EPOCHS = 10
#: No augmentation, 25 epochs, frozen backbone, features included, against the reference's 25 epochs.
VIEWS_TARGET = 0.10
#: Environments of the busy-machine scenario: how the stages' OpenMP threads wait when idle.
#: ``None`` removes a variable, so ``project`` gets the stages' own default (stages/__init__.py:
#: GOMP_SPINCOUNT=10000); ``gomp-default`` is GNU OpenMP's default spin (300,000 iterations,
#: what a plain torch script such as the tutorial gets); ``active`` spins without bound;
#: ``passive`` sleeps at once.
BUSY_VARIANTS: dict[str, dict[str, str | None]] = {
    "project": dict.fromkeys(OPENMP_WAIT_VARS),
    "gomp-default": {"OMP_WAIT_POLICY": None, "KMP_BLOCKTIME": None, "GOMP_SPINCOUNT": "300000"},
    "active": {"GOMP_SPINCOUNT": None, "KMP_BLOCKTIME": None, "OMP_WAIT_POLICY": "ACTIVE"},
    "passive": {"GOMP_SPINCOUNT": None, "KMP_BLOCKTIME": None, "OMP_WAIT_POLICY": "PASSIVE"},
}
#: Environment variables that change speed, recorded with the results.
SPEED_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", *OPENMP_WAIT_VARS, "CUDA_VISIBLE_DEVICES")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def views_value(text: str) -> int | str:
    if text == "auto":
        return text
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("views must be auto or a number >= 0")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=positive, default=TARGET_EPOCHS, help="epochs of the main comparison, both sides")
    p.add_argument("--repeats", type=positive, default=1,
                   help="runs of every measurement (interleaved); figures are medians over them")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes of the main comparison")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="the main comparison, reference against project (--no-compare: scenarios only)")
    p.add_argument("--evaluate", action="store_true",
                   help="after the comparison, run dvc repro evaluate@<mode> (untimed) and report its accuracy")
    p.add_argument("--zip", type=Path, default=DEFAULT_ZIP, help="the hymenoptera_data archive")
    p.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE, help="the reference loop")
    p.add_argument("--subset", type=positive, metavar="N",
                   help="smoke runs: keep only the first N images of each class of each split")
    scenario = p.add_argument_group("scenarios")
    scenario.add_argument("--views", type=views_value, metavar="V",
                          help="run the frozen-backbone scenario with train.feature_extract.views=V "
                          "(0: no augmentation, each image's validation crop, one stored view)")
    scenario.add_argument("--views-epochs", type=positive, default=25, help="epochs of the views scenario")
    scenario.add_argument("--views-reference", choices=("reuse", "measure"), default="reuse",
                          help="reuse: extrapolate the reference's time from its feature_extract runs of the main "
                          "comparison (start-up + median epoch x epochs); measure: run the reference at "
                          "--views-epochs too (about 9 minutes at 25 epochs on 2 cores)")
    scenario.add_argument("--busy", action="store_true",
                          help="the busy-machine scenario: train@finetune alone, then two copies at once")
    scenario.add_argument("--busy-epochs", type=positive, default=3, help="finetune epochs of the busy scenario")
    scenario.add_argument("--busy-variants", nargs="+", choices=list(BUSY_VARIANTS),
                          default=["project", "gomp-default"], help="OpenMP wait settings to compare")
    scenario.add_argument("--scale", type=positive, metavar="F",
                          help="the scaling scenario: generate a data set F times larger and run both train stages "
                          "on it and on the original")
    scenario.add_argument("--scale-epochs", type=positive, default=1, help="epochs (both modes) of the scale scenario")
    scenario.add_argument("--memory-limit-mib", type=float, default=3072,
                          help="the issue's limit for a train stage's peak resident memory")
    p.add_argument("--workers", type=positive, default=len(os.sched_getaffinity(0)),
                   help="processes generating the scaled data set")
    p.add_argument("--sample-interval", type=float, default=0.5,
                   help="seconds between samples of a process tree's memory")
    p.add_argument("--workdir", type=Path,
                   help="where the copies, data and logs go; a new temporary folder if not given")
    p.add_argument("--keep", action="store_true", help="keep the work folder (it is kept anyway after a failure)")
    p.add_argument("--out", type=Path, help="JSON results (default: benchmarks/results/<timestamp>.json)")
    p.add_argument("--report", type=Path, metavar="RESULTS",
                   help="run nothing: print the tables of a results file (one whose run was killed, too)")
    args = p.parse_args(argv)
    if not args.compare and args.views is not None and args.views_reference == "reuse":
        p.error("--views-reference reuse needs the main comparison (drop --no-compare or use measure)")
    if args.views is not None and args.views_reference == "reuse" and "feature_extract" not in args.modes:
        p.error("--views-reference reuse needs feature_extract among --modes")
    return args


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def machine() -> dict[str, Any]:
    """What the figures were measured on (they mean little without it)."""
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = {}
    for name in ("torch", "torchvision", "dvc", "numpy", "pillow", "pandas", "psutil"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(memory, 1),
            "python": sys.version.split()[0], "versions": versions,
            "env": {name: os.environ.get(name) for name in SPEED_VARS}}


class Benchmark:
    """One invocation: the data, the project copy, every run, and the results file."""

    def __init__(self, args: argparse.Namespace, work: Path, out: Path) -> None:
        self.args = args
        self.work = work
        self.logs = work / "logs"
        self.out = out
        self.counter = 0
        self.results: dict[str, Any] = {
            "started_at": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": [sys.executable, *sys.argv],
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": machine(),
            "source": git_state(REPO),
            "workdir": str(work),
            "data": {},
            "setup": [],
            "runs": [],
            "summary": {},
            "notes": [],
        }
        self.copy: ProjectCopy | None = None
        self.reference_data = work / "data" / "reference"
        self.base_zip = args.zip

    # ------------------------------------------------------------------ bookkeeping

    def save(self) -> None:
        """Write the results so far (after every run, so a long run that fails keeps them)."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str) + "\n", encoding="utf-8")
        tmp.replace(self.out)

    def name(self, label: str) -> str:
        self.counter += 1
        return f"{self.counter:03d}-{label}"

    def setup_step(self, label: str, measured: Measured) -> None:
        self.results["setup"].append({"step": label, **measured.as_dict()})
        log(f"  {label}: {measured.wall_seconds:.1f}s")
        self.save()

    def add(self, run: dict[str, Any]) -> dict[str, Any]:
        self.results["runs"].append(run)
        f = run["figures"]
        log(f"  {run['scenario']} {run['side']} {run['mode']} #{run['repeat']}: {f['wall_seconds']:.1f}s wall, "
            f"{f.get('epoch_seconds_median', math.nan):.2f}s/epoch")
        self.save()
        return run

    # ------------------------------------------------------------------ set-up

    def prepare(self) -> None:
        """The archive the project fetches (the real one, or a subset for smoke runs) and the
        same images unpacked for the reference loop; then the project copy, with fetch, unzip
        and weights run once, untimed."""
        args = self.args
        if not args.zip.is_file():
            raise BenchmarkError(f"no archive at {args.zip} (use --zip)")
        if not args.baseline.is_file():
            raise BenchmarkError(f"no reference loop at {args.baseline} (use --baseline)")
        if importlib.util.find_spec("dvc") is None:
            raise BenchmarkError(f"{sys.executable} has no dvc: run this with the project's venv (.venv/bin/python)")
        if args.subset:
            self.base_zip = subset_zip(args.zip, self.work / "data" / f"subset-{args.subset}.zip", args.subset)
        extract(self.base_zip, self.reference_data)
        counts = count_images(self.reference_data)
        self.results["data"]["base"] = {"zip": str(self.base_zip), "images": counts}
        log(f"data: {self.base_zip} ({counts['train']} train / {counts['val']} val images)")

        self.copy = ProjectCopy.create(REPO, self.work / "project", self.logs, args.sample_interval, {
            "data.url": str(self.base_zip.resolve()), "data.sha256": None, "model.weights": "none", "device": "cpu",
            "train.finetune.epochs": args.epochs, "train.feature_extract.epochs": args.epochs,
        })
        self.setup_step("dvc repro unzip weights", self.copy.dvc("repro", "unzip", "weights",
                                                                  name=self.name("setup-unzip-weights")))
        project_counts = count_images(self.copy.root / "data" / "hymenoptera_data")
        if project_counts != counts:
            self.results["notes"].append(f"image counts differ: reference {counts}, project {project_counts}")
            log(f"warning: reference sees {counts} images, the project's unzip stage {project_counts}")
        self.results["data"]["base"]["project_images"] = project_counts
        self.results["data"]["params"] = self.copy.params()

    # ------------------------------------------------------------------ the two sides

    def reference(self, mode: str, epochs: int, scenario: str, repeat: int) -> dict[str, Any]:
        """The tutorial's loop, timed from outside (``tutorial_baseline.py DATA_DIR MODE EPOCHS``)."""
        log(f"{scenario}: reference {mode}, {epochs} epochs, run {repeat}")
        measured = check(run_measured(
            [sys.executable, str(self.args.baseline), str(self.reference_data), mode, str(epochs)],
            cwd=self.work, env=environment(), logs=self.logs,
            name=self.name(f"reference-{mode}-{epochs}"), interval=self.args.sample_interval))
        rows, summary = [], None
        for line in Path(measured.stdout).read_text(encoding="utf-8").splitlines():
            if line.startswith("{"):
                row = json.loads(line)
                if row.get("summary"):
                    summary = row
                else:
                    rows.append(row)
        if summary is None or len(rows) != epochs:
            raise BenchmarkError(f"reference {mode}: expected {epochs} epoch lines and a summary in {measured.stdout}")
        seconds = [row["seconds"] for row in rows]
        counts = self.results["data"]["base"]["images"]
        return self.add({
            "scenario": scenario, "side": "reference", "mode": mode, "repeat": repeat, "epochs": epochs,
            "measured": measured.as_dict(), "epochs_rows": rows, "summary": summary,
            "figures": {
                "wall_seconds": measured.wall_seconds,
                "loop_seconds": round(summary["total_seconds"], 3),
                "overhead_seconds": round(measured.wall_seconds - sum(seconds), 3),
                "load_before": measured.loadavg_before[0],
                "epoch_seconds_median": median(seconds),
                "run_images_per_second": (counts["train"] + counts["val"]) * epochs / measured.wall_seconds,
                "peak_largest_process_mib": measured.largest_process_peak_mib,
                "peak_tree_pss_mib": measured.tree_peak_pss_mib,
                "peak_tree_rss_mib": measured.tree_peak_rss_mib,
                "cpu_seconds": round(measured.cpu_user_seconds + measured.cpu_system_seconds, 2),
                "best_val_acc": summary["best_val_acc"],
                "final_val_acc": rows[-1]["val_acc"],
            },
        })

    def project(self, mode: str, epochs: int, scenario: str, repeat: int, copy: ProjectCopy | None = None,
                overrides: Mapping[str, str | None] | None = None, images: Mapping[str, int] | None = None,
                label: str = "", extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``dvc repro train@<mode>`` timed from outside, plus the stages' run records. For
        feature_extract that runs the features stage (the frozen backbone, once) and then the
        head's training on its stored outputs."""
        copy = copy or self.copy
        assert copy is not None
        log(f"{scenario}: project {mode}, {epochs} epochs, run {repeat}{label}")
        stages = ["train@finetune"] if mode == "finetune" else ["features", "train@feature_extract"]
        measured = copy.repro(f"train@{mode}", stages, name=self.name(f"project-{mode}-{epochs}{label}"),
                              overrides=overrides)
        return self.project_run(copy, mode, epochs, scenario, repeat, measured, images, overrides, extra)

    def project_run(self, copy: ProjectCopy, mode: str, epochs: int, scenario: str, repeat: int, measured: Measured,
                    images: Mapping[str, int] | None = None, overrides: Mapping[str, str | None] | None = None,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        train = copy.read_json(f"reports/{mode}/train.json")
        if train.get("epochs") != epochs:
            raise BenchmarkError(f"train@{mode} ran {train.get('epochs')} epochs, expected {epochs}")
        counts = images or self.results["data"]["base"]["project_images"]
        figures: dict[str, Any] = {
            "wall_seconds": measured.wall_seconds,
            "epoch_seconds_median": median(train["epoch_seconds"]),
            "train_stage_seconds": train["wall_seconds"],
            "train_images_per_second": train["train_images_per_second"],
            "run_images_per_second": (counts["train"] + counts["val"]) * epochs / measured.wall_seconds,
            "train_stage_peak_mib": train["peak_memory_mib"],
            "peak_largest_process_mib": measured.largest_process_peak_mib,
            "peak_tree_pss_mib": measured.tree_peak_pss_mib,
            "peak_tree_rss_mib": measured.tree_peak_rss_mib,
            "cpu_seconds": round(measured.cpu_user_seconds + measured.cpu_system_seconds, 2),
            "load_before": measured.loadavg_before[0],
            "best_val_acc": train["best_val_acc"],
            "final_val_acc": train["final"]["val_acc"],
            "threads": train.get("threads"),
            "loader_workers": train.get("loader_workers"),
        }
        records: dict[str, Any] = {"train": train}
        if mode == "feature_extract":
            features = copy.read_json("reports/features.json")
            records["features"] = features
            figures |= {
                "features_seconds": features["wall_seconds"],
                "features_backbone_passes": features["backbone_passes"],
                "features_images_per_second": features["images_per_second"],
                "features_peak_mib": features["peak_memory_mib"],
                "head_seconds": train["wall_seconds"],
            }
        inside = train["wall_seconds"] + figures.get("features_seconds", 0.0)
        figures["overhead_seconds"] = round(measured.wall_seconds - inside, 3)
        return self.add({"scenario": scenario, "side": "project", "mode": mode, "repeat": repeat, "epochs": epochs,
                         "copy": str(copy.root), "measured": measured.as_dict(), "records": records,
                         "overrides": dict(overrides or {}), **(extra or {}), "figures": figures})

    # ------------------------------------------------------------------ scenarios

    def compare(self) -> None:
        """Reference, project, reference, project, ... for each mode, at ``--epochs``."""
        assert self.copy is not None
        for mode in self.args.modes:
            for repeat in range(1, self.args.repeats + 1):
                self.reference(mode, self.args.epochs, "compare", repeat)
                self.project(mode, self.args.epochs, "compare", repeat)
            if self.args.evaluate:
                measured = self.copy.dvc("repro", "--no-run-cache", f"evaluate@{mode}",
                                         name=self.name(f"evaluate-{mode}"))
                metrics = self.copy.read_json(f"metrics/{mode}.json")
                self.results["setup"].append({"step": f"evaluate@{mode}", "metrics": metrics, **measured.as_dict()})
                self.results.setdefault("evaluate", {})[mode] = metrics
                log(f"  evaluate@{mode}: accuracy {metrics.get('accuracy')}")
                self.save()

    def views(self) -> None:
        """The frozen backbone with ``views`` stored views at ``--views-epochs`` (features
        stage included) against the reference's feature_extract at as many epochs."""
        assert self.copy is not None
        args, copy = self.args, self.copy
        before = copy.params()["train"]["feature_extract"]
        copy.set_params({"train.feature_extract.views": args.views, "train.feature_extract.epochs": args.views_epochs})
        try:
            for repeat in range(1, args.repeats + 1):
                if args.views_reference == "measure":
                    self.reference("feature_extract", args.views_epochs, "views", repeat)
                self.project("feature_extract", args.views_epochs, "views", repeat, label=f"-views{args.views}")
        finally:
            copy.set_params({"train.feature_extract.views": before["views"],
                             "train.feature_extract.epochs": before["epochs"]})

    def busy(self) -> None:
        """train@finetune alone, then two identical copies at once on the same cores, for
        each OpenMP wait setting: how much a second job slows an epoch down (2x is fair
        sharing of the cores; much more means threads waste the cores spinning)."""
        assert self.copy is not None
        args, first = self.args, self.copy
        epochs_before = first.params()["train"]["finetune"]["epochs"]
        first.set_params({"train.finetune.epochs": args.busy_epochs})
        second = first.clone(self.work / "project-b")
        try:
            for variant in args.busy_variants:
                overrides = BUSY_VARIANTS[variant]
                for repeat in range(1, args.repeats + 1):
                    self.project("finetune", args.busy_epochs, f"busy:{variant}:solo", repeat,
                                 overrides=overrides, label=f"-{variant}-solo", extra={"variant": variant})
                    log(f"busy: {variant}, two copies of train@finetune at once, run {repeat}")

                    def job(copy: ProjectCopy, tag: str, variant: str = variant,
                            overrides: Mapping[str, str | None] = overrides) -> Measured:
                        return copy.repro("train@finetune", ["train@finetune"], overrides=overrides,
                                          name=self.name(f"project-finetune-{variant}-shared-{tag}"))

                    with ThreadPoolExecutor(2) as pool:
                        futures = [pool.submit(job, copy, tag) for copy, tag in ((first, "a"), (second, "b"))]
                        try:
                            measured = [future.result() for future in futures]
                        except BaseException:  # Ctrl-C: the pool would wait for both runs to finish
                            end_all()
                            raise
                    for copy, tag, m in zip((first, second), "ab", measured, strict=True):
                        self.project_run(copy, "finetune", args.busy_epochs, f"busy:{variant}:shared-{tag}",
                                         repeat, m, overrides=overrides, extra={"variant": variant})
        finally:
            first.set_params({"train.finetune.epochs": epochs_before})
            shutil.rmtree(second.root.parent, ignore_errors=True)

    def scale(self) -> None:
        """Both train stages at ``--scale-epochs`` on the base data set, then on one
        ``--scale`` times larger: seconds per image should not grow, and a train stage's peak
        memory should stay within the image cache's budget plus the model."""
        assert self.copy is not None
        args, copy = self.args, self.copy
        factor = args.scale
        scaled = self.work / "data" / f"scaled-x{factor}.zip"
        log(f"scale: generating a data set {factor}x the size of {self.base_zip.name} ({args.workers} processes)")
        started = time.perf_counter()
        scaled_zip(self.base_zip, scaled, factor, workers=args.workers)
        self.results["data"]["scaled"] = {"zip": str(scaled), "factor": factor, "bytes": scaled.stat().st_size,
                                          "generate_seconds": round(time.perf_counter() - started, 1)}
        copy.set_params({"train.finetune.epochs": args.scale_epochs, "train.feature_extract.epochs": args.scale_epochs,
                         "train.feature_extract.views": "auto"})
        sizes: list[tuple[str, Callable[[], dict[str, int]]]] = [
            ("x1", lambda: self.results["data"]["base"]["project_images"]),
            (f"x{factor}", lambda: self.use_data(scaled, "scaled")),
        ]
        cache_mb = copy.params()["runtime"]["image_cache_mb"]
        for size, images in sizes:
            counts = images()
            for repeat in range(1, args.repeats + 1):
                for mode in MODES:
                    self.project(mode, args.scale_epochs, f"scale:{size}", repeat, images=counts, label=f"-{size}",
                                 extra={"images": counts, "image_cache_mb": cache_mb})

    def use_data(self, archive: Path, key: str) -> dict[str, int]:
        """Point the copy's ``data.url`` at ``archive``; fetch and unzip it (untimed)."""
        assert self.copy is not None
        self.copy.set_params({"data.url": str(archive.resolve())})
        measured = self.copy.dvc("repro", "unzip", name=self.name(f"setup-unzip-{key}"))
        self.setup_step(f"dvc repro unzip ({key})", measured)
        counts = count_images(self.copy.root / "data" / "hymenoptera_data")
        self.results["data"][key]["project_images"] = counts
        self.save()
        return counts


# ---------------------------------------------------------------------- summary tables

def frame(runs: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> pd.DataFrame:
    """One row per run: ``keys`` (scenario, side, ...) and every figure."""
    return pd.DataFrame([{**{k: run.get(k) for k in keys}, **run["figures"]} for run in runs])


def medians(df: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """Median of every figure over the runs of each ``keys`` group, with the count of runs."""
    numeric = df.drop(columns=list(keys)).apply(pd.to_numeric, errors="coerce")
    grouped = pd.concat([df[list(keys)], numeric], axis=1).groupby(list(keys), sort=False)
    out = grouped.median(numeric_only=True)
    out.insert(0, "runs", grouped.size())
    return out.reset_index()


def col(df: pd.DataFrame, name: str) -> pd.Series:
    return df[name] if name in df else pd.Series(math.nan, index=df.index)


def yes_no(ok: bool | float) -> str:
    return "n/a" if isinstance(ok, float) and math.isnan(ok) else ("yes" if ok else "NO")


@dataclass
class Table:
    """One printed table: ``key`` names it in the results file's ``summary``."""

    key: str
    title: str
    table: pd.DataFrame
    note: str


def compare_tables(runs: Sequence[Mapping[str, Any]], results: Mapping[str, Any],
                   args: argparse.Namespace) -> list[Table]:
    compare = [r for r in runs if r["scenario"] == "compare"]
    if not compare:
        return []
    m = medians(frame(compare, ["mode", "side"]), ["mode", "side"])
    evaluated = results.get("evaluate", {})
    table = pd.DataFrame({
        "mode": m["mode"], "side": m["side"], "runs": m["runs"],
        "wall s": m["wall_seconds"], "overhead s": m["overhead_seconds"], "s/epoch": m["epoch_seconds_median"],
        "features s": col(m, "features_seconds"), "head s": col(m, "head_seconds"),
        "run img/s": m["run_images_per_second"], "train img/s": col(m, "train_images_per_second"),
        "features img/s": col(m, "features_images_per_second"),
        "peak MiB": m["peak_largest_process_mib"], "tree PSS MiB": m["peak_tree_pss_mib"],
        "CPU s": m["cpu_seconds"], "load": m["load_before"],
        "best val acc": m["best_val_acc"], "final val acc": m["final_val_acc"],
    })
    if evaluated:
        table["evaluate acc"] = [evaluated.get(mode, {}).get("accuracy", math.nan) if side == "project" else math.nan
                                 for mode, side in zip(m["mode"], m["side"], strict=True)]
    tables = [Table("compare", f"Main comparison: {args.epochs} epochs, medians over runs (runs = how many)", table,
                    "wall s: the whole command (reference: the script; project: dvc repro train@<mode>). overhead s: "
                    "wall s minus the timed work (reference: its epochs; project: the stages' own wall_seconds), i.e. "
                    "start-up, imports, DVC. s/epoch: median epoch (train + val); for project feature_extract it is "
                    "the head's epoch on stored features: the backbone work is the features stage (features s), "
                    "head s is the train@feature_extract stage. run img/s: (train + val images) x epochs / wall s. "
                    "train img/s: the stage's train phase only. peak MiB: the largest single process (wait4 "
                    "ru_maxrss; reference: its main process, project: the train stage); tree PSS MiB: sampled sum "
                    "over the command's process tree (reference: main + 4 DataLoader workers; project: dvc + "
                    "stage). CPU s: user + system of the tree. load: 1-minute load average before the run (a busy "
                    "machine shows here). Accuracies: random init, so low and noisy; they show nothing broke.")]
    rows = []
    for mode in args.modes:
        ref = m[(m["mode"] == mode) & (m["side"] == "reference")]
        proj = m[(m["mode"] == mode) & (m["side"] == "project")]
        if ref.empty or proj.empty:
            continue
        ratio = float(proj["wall_seconds"].iloc[0]) / float(ref["wall_seconds"].iloc[0])
        pairs = [p["figures"]["wall_seconds"] / r["figures"]["wall_seconds"] for r, p in zip(
            [r for r in compare if r["mode"] == mode and r["side"] == "reference"],
            [r for r in compare if r["mode"] == mode and r["side"] == "project"], strict=False)]
        rows.append({"mode": mode, "epochs": args.epochs, "runs": int(proj["runs"].iloc[0]),
                     "reference wall s": float(ref["wall_seconds"].iloc[0]),
                     "project wall s": float(proj["wall_seconds"].iloc[0]),
                     "ratio": ratio, "ratio per pair (median)": median(pairs),
                     "target": TARGETS[mode], "met": yes_no(ratio <= TARGETS[mode])})
    if rows:
        note = ("ratio: median project wall / median reference wall; per pair: the median of each repeat's "
                "project / reference (the two ran back to back).")
        if args.epochs != TARGET_EPOCHS:
            note += f" The targets are set for {TARGET_EPOCHS} epochs; this run used {args.epochs}."
        tables.append(Table("ratios", "Project / reference, whole-run wall time", pd.DataFrame(rows), note))
    return tables


def views_table(runs: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> list[Table]:
    views = [r for r in runs if r["scenario"] == "views"]
    proj = [r for r in views if r["side"] == "project"]
    if not proj:
        return []
    ref_runs = [r for r in views if r["side"] == "reference"]
    if ref_runs:
        ref_walls = [r["figures"]["wall_seconds"] for r in ref_runs]
        source = f"measured at {args.views_epochs} epochs"
    else:  # extrapolated from the comparison's feature_extract runs
        base = [r for r in runs if r["scenario"] == "compare" and r["side"] == "reference"
                and r["mode"] == "feature_extract"]
        ref_walls = [r["figures"]["overhead_seconds"] + args.views_epochs * r["figures"]["epoch_seconds_median"]
                     for r in base]
        source = (f"extrapolated from {len(base)} reference run(s) of {args.epochs} epochs in this invocation: "
                  f"start-up (wall - sum of epochs) + {args.views_epochs} x median epoch")
    walls = [r["figures"]["wall_seconds"] for r in proj]
    ratio = median(walls) / median(ref_walls)
    table = pd.DataFrame([{
        "views": args.views, "epochs": args.views_epochs, "runs": len(proj), "project wall s": median(walls),
        "features s": median([r["figures"]["features_seconds"] for r in proj]),
        "head s": median([r["figures"]["head_seconds"] for r in proj]),
        "head s/epoch": median([r["figures"]["epoch_seconds_median"] for r in proj]),
        "backbone passes": median([r["figures"]["features_backbone_passes"] for r in proj]),
        "reference runs": len(ref_walls), "reference wall s": median(ref_walls), "ratio": ratio,
        "target": VIEWS_TARGET, "met": yes_no(ratio < VIEWS_TARGET),
        "project best val acc": median([r["figures"]["best_val_acc"] for r in proj]),
        "reference best val acc": median([r["figures"]["best_val_acc"] for r in ref_runs]),
    }])
    return [Table("views", f"Frozen backbone, views={args.views}, {args.views_epochs} epochs (features stage "
                  "included) against the reference's feature_extract", table,
                  f"project wall s: dvc repro train@feature_extract (features + head). reference wall s: {source}. "
                  "views 0 = no augmentation (each training image's validation crop, one stored view); "
                  "N = N seeded random views reused in turn; auto = one per epoch.")]


def busy_table(runs: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> list[Table]:
    busy = [r for r in runs if r["scenario"].startswith("busy:")]
    rows = []
    for variant in args.busy_variants:
        solo = [r for r in busy if r["scenario"] == f"busy:{variant}:solo"]
        shared = [r for r in busy if r["scenario"].startswith(f"busy:{variant}:shared")]
        if not solo or not shared:
            continue
        solo_epoch = median([r["figures"]["epoch_seconds_median"] for r in solo])
        shared_epoch = median([r["figures"]["epoch_seconds_median"] for r in shared])
        rows.append({
            "variant": variant,
            "env": " ".join(f"{k}={v}" for k, v in BUSY_VARIANTS[variant].items() if v is not None)
            or "(stages' own)",
            "solo runs": len(solo), "solo s/epoch": solo_epoch,
            "shared runs": len(shared), "shared s/epoch": shared_epoch,
            "slowdown": shared_epoch / solo_epoch,
            "solo CPU s": median([r["figures"]["cpu_seconds"] for r in solo]),
            "shared CPU s": median([r["figures"]["cpu_seconds"] for r in shared]),
            "solo load": median([r["figures"]["load_before"] for r in solo]),
        })
    if not rows:
        return []
    return [Table("busy", f"Busy machine: train@finetune, {args.busy_epochs} epochs, alone vs two copies at once",
                  pd.DataFrame(rows),
                  "s/epoch: median epoch of the train stage (shared: over both copies' runs). Two equal jobs on "
                  "the same cores: 2x is fair sharing; much more means idle threads spin and take the other "
                  "job's cores. CPU s: user + system of the whole dvc command. solo load: the 1-minute load "
                  "average before the solo runs (solo means no second copy, not an idle machine).")]


def scale_table(runs: Sequence[Mapping[str, Any]], args: argparse.Namespace) -> list[Table]:
    scale = [r for r in runs if r["scenario"].startswith("scale:")]
    if not scale:
        return []
    m = medians(frame(scale, ["scenario", "mode"]), ["scenario", "mode"])

    def figure(scenario: str, mode: str, name: str) -> float:
        row = m[(m["scenario"] == scenario) & (m["mode"] == mode)]
        return float(row[name].iloc[0]) if not row.empty and name in row else math.nan

    rows = []
    for scenario in dict.fromkeys(m["scenario"]):
        first = next(r for r in scale if r["scenario"] == scenario)
        peaks = [p for p in (figure(scenario, "finetune", "train_stage_peak_mib"),
                             figure(scenario, "feature_extract", "train_stage_peak_mib")) if not math.isnan(p)]
        row = {
            "data set": scenario.split(":", 1)[1], "train imgs": first["images"]["train"],
            "val imgs": first["images"]["val"], "runs": len([r for r in scale if r["scenario"] == scenario
                                                             and r["mode"] == "finetune"]),
            "finetune train img/s": figure(scenario, "finetune", "train_images_per_second"),
            "finetune s/epoch": figure(scenario, "finetune", "epoch_seconds_median"),
            "features img/s": figure(scenario, "feature_extract", "features_images_per_second"),
            "finetune peak MiB": figure(scenario, "finetune", "train_stage_peak_mib"),
            "features peak MiB": figure(scenario, "feature_extract", "features_peak_mib"),
            "head peak MiB": figure(scenario, "feature_extract", "train_stage_peak_mib"),
            "image_cache_mb": first["image_cache_mb"],
            f"train peak < {args.memory_limit_mib:g} MiB": yes_no(max(peaks) < args.memory_limit_mib)
            if peaks else "n/a",
        }
        row["ms/train img"] = 1000 / row["finetune train img/s"]
        row["ms/backbone pass"] = 1000 / row["features img/s"]
        rows.append(row)
    table = pd.DataFrame(rows)
    note = ("train img/s: train@finetune's train phase; features img/s: backbone passes per second of the "
            "features stage (views x train images + val images; its own wall time, so decoding included). "
            "Peaks: each stage's peak RSS (run records, getrusage: the stage process or its largest worker). ")
    if len(table) == 2:
        grow = table["ms/train img"].iloc[1] / table["ms/train img"].iloc[0]
        grow_f = table["ms/backbone pass"].iloc[1] / table["ms/backbone pass"].iloc[0]
        note += (f"Time per image, larger / original: train {grow:.2f}x, features {grow_f:.2f}x "
                 "(1.00x: time per image does not grow with the data).")
    return [Table("scale", f"Scaling: both train stages, {args.scale_epochs} epoch(s), original vs {args.scale}x "
                  "data set", table, note)]


def summarise(results: dict[str, Any], args: argparse.Namespace) -> list[Table]:
    """The tables to print; they also go to ``results["summary"]`` (by key)."""
    runs = results["runs"]
    tables = [*compare_tables(runs, results, args), *views_table(runs, args), *busy_table(runs, args),
              *scale_table(runs, args)]
    results["summary"] = {t.key: {"title": t.title, "note": t.note, "rows": json.loads(t.table.to_json(
        orient="records"))} for t in tables}
    return tables


def show(tables: Sequence[Table], results: Mapping[str, Any]) -> None:
    mach = results["machine"]
    print(f"\nMachine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB; torch "
          f"{mach['versions']['torch']}, dvc {mach['versions']['dvc']}; source {results['source']}")
    with pd.option_context("display.width", 250, "display.max_columns", None,
                           "display.float_format", lambda x: f"{x:,.3f}" if abs(x) < 10 else f"{x:,.1f}"):
        for t in tables:
            print(f"\n== {t.title}\n{t.table.to_string(index=False)}")
            print(textwrap.fill(t.note, width=120, initial_indent="   ", subsequent_indent="   "))
    for note in results["notes"]:
        print(f"\nnote: {note}")


def report(path: Path) -> int:
    """Tables from a saved results file, with the options its run was given."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        print(f"error: cannot read results file {path}: {error}", file=sys.stderr)
        return 1
    if not results.get("runs"):
        print(f"error: {path} holds no runs", file=sys.stderr)
        return 1
    tables = summarise(results, argparse.Namespace(**results["config"]))
    show(tables, results)
    if not results.get("completed"):
        print(f"\nnote: the run that wrote {path} did not complete; the tables show what it measured")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        return report(args.report)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or HERE / "results" / f"{stamp}.json"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="speed-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    bench = Benchmark(args, work.resolve(), out)
    log(f"work folder {work}, results -> {out}")
    failed = True
    try:
        with interrupts_end_children():
            bench.prepare()
            if args.compare:
                bench.compare()
            if args.views is not None:
                bench.views()
            if args.busy:
                bench.busy()
            if args.scale:
                bench.scale()
        failed = False
    except KeyboardInterrupt:
        log("interrupted")
    except BenchmarkError as error:
        log(f"error: {error}")
    finally:
        bench.results["finished_at"] = datetime.now().astimezone().isoformat(timespec="seconds")
        bench.results["completed"] = not failed
        tables = summarise(bench.results, args) if bench.results["runs"] else []
        bench.save()
        show(tables, bench.results)
        print(f"\nresults: {out}")
        if failed or args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
