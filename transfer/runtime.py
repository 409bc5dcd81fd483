"""How a stage runs (``runtime.*``: how fast, not what, so no stage declares them to DVC), and
the run record of what it ran on, kept apart from the metrics since its timings differ on
every run. The thread count can change a run's last bits (sums add in another order): recorded.
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from importlib import metadata
from typing import Any

import torch

from transfer.devices import describe_device


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def configure_threads(setting: int | str, processes: int = 1) -> int:
    """Set torch's intra-op threads (``auto``: the available cores shared among ``processes``
    training on this machine); return the count."""
    threads = max(1, available_cores() // processes) if setting == "auto" else int(setting)
    torch.set_num_threads(threads)
    return threads


def resolve_workers(setting: int | str, device: torch.device, processes: int = 1) -> int:
    """DataLoader worker processes of each of ``processes`` training processes on this machine.
    ``auto`` on the CPU is 0: the model's threads already use every core, and loader processes
    beside them only take turns with them (with images decoded once and cached, preparing a
    batch costs about 1% of a training step). On a GPU the CPU prepares batches while the GPU
    computes: the spare cores shared among the processes, at least one each, at most 8."""
    if setting != "auto":
        return int(setting)
    if device.type == "cpu":
        return 0
    return max(1, min(8, available_cores() // processes - 1))


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); without it, torch
    emulates bf16 and autocast runs several times slower than float32."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def amp_warning(device: torch.device, amp: bool) -> str | None:
    if amp and device.type == "cpu" and not native_bf16():
        return ("warning: train.amp on a CPU without native bfloat16 (AVX512-BF16 or AMX) is emulated "
                "and several times slower than float32; set train.amp: false")
    return None


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """The commit the working tree is based on, and whether code, params or config differ
    from it (outputs the pipeline itself rewrites, dvc.lock, metrics/ and plots/, aside)."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".",
                   ":!dvc.lock", ":!metrics", ":!plots")
    return {"commit": commit, "dirty": bool(changed)}


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def peak_memory_mib() -> float:
    """Peak resident memory of this process or of the largest of its finished loader workers
    (the features stage runs its backbone in them), whichever is larger."""
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 1024**2  # ru_maxrss: KiB on Linux, bytes on macOS
    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return round(peak * scale, 1)


def run_record(device: torch.device, threads: int, workers: int, **details: Any) -> dict[str, Any]:
    """What explains a stage's run besides its params: versions, machine, git state, and
    ``details`` (timings, counts) from the stage."""
    return {
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
