"""The run record: what a stage ran on (versions, machine, git state, device, threads, timings),
kept in ``reports/`` apart from the metrics, since its timings differ on every run.
"""

from __future__ import annotations

import platform
import resource
import subprocess
import sys
import time
from importlib import metadata
from typing import Any

import torch

from transfer.devices import available_cores, describe_device


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """The commit the working tree is based on, and whether code, params or config differ
    from it (outputs the pipeline itself rewrites, dvc.lock, metrics/ and plots/, aside)."""
    commit = _git("rev-parse", "HEAD")
    return {"commit": commit, "dirty": None if commit is None else bool(
        _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock", ":!metrics", ":!plots"))}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def peak_memory_mib() -> float:
    """Peak resident memory of this process or of the largest of its finished loader workers
    (the features stage runs its backbone in them), whichever is larger."""
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return round(peak / (1024**2 if sys.platform == "darwin" else 1024), 1)  # ru_maxrss: bytes on macOS, else KiB


def run_record(device: torch.device, threads: int, workers: int, started: float, **details: Any) -> dict[str, Any]:
    """What explains a stage's run besides its params: its wall time since ``started`` (a
    ``time.perf_counter()``), versions, machine, git state, and ``details`` (timings, counts)
    from the stage."""
    return {
        "wall_seconds": round(time.perf_counter() - started, 2),
        "git": git_state(),
        "versions": {name: _version(name) for name in ("torch", "torchvision", "numpy", "pillow", "dvc", "timm")}
        | {"python": platform.python_version()},
        "machine": {"platform": platform.platform(), "cores": available_cores()},
        "device": describe_device(device),
        "threads": threads,
        "loader_workers": workers,
        "peak_memory_mib": peak_memory_mib(),
        **({"peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}
           if device.type == "cuda" else {}),
        **details,
    }
