"""Where and how fast a stage computes: the device (the ``device`` param), mixed precision, and
the threads and loader workers (``runtime.*``: how fast, not what, so no stage declares them
to DVC; the thread count can change a run's last bits, as sums add in another order, so the
run record says it)."""

from __future__ import annotations

import os
import re

import torch

from transfer.errors import ParamError, UserError, say

_SPEC = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def resolve_device(spec: str, source: str = "params.yaml") -> torch.device:
    """Turn ``auto | cpu | cuda | cuda:N | mps`` into an available device, or fail clearly.

    ``auto`` prefers CUDA, then Apple's MPS, then the CPU. A device asked for by name that
    this machine does not have is an error rather than a silent fallback: a run that was
    meant for a GPU should not quietly take a day on the CPU.
    """
    if not _SPEC.fullmatch(spec):
        raise ParamError("device", f"must be auto, cpu, cuda, cuda:N or mps, got {spec!r}", source)
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    # auto: the first available, in this order
    device = torch.device(next(kind for kind, present in available.items() if present) if spec == "auto" else spec)
    if not available[device.type]:
        raise UserError(f"device {spec!r} was asked for, but {device.type.upper()} is not available on this machine "
                        "(set device: auto or cpu in the params)")
    count = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= count:
        raise UserError(f"device {spec!r} was asked for, but this machine has {count} CUDA "
                        f"device(s): use cuda:0..cuda:{count - 1}")
    return device


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """The dtype of a loop's running sums: float64 (sums of hundreds of losses keep their last
    digits), but float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    """Mixed precision: float16 on CUDA, bfloat16 elsewhere; a no-op when disabled."""
    return torch.autocast(device.type, dtype=torch.float16 if device.type == "cuda" else torch.bfloat16,
                          enabled=enabled)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``, so that a timing covers it (GPUs run ahead of
    the Python code that queues their work)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def describe_device(device: torch.device) -> str:
    """A human-readable name for metrics: 'cpu', 'cuda:0 (NVIDIA H200)', 'mps'."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return device.type


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
    return 0 if device.type == "cpu" else max(1, min(8, available_cores() // processes - 1))


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); without it, torch
    emulates bf16 and autocast runs several times slower than float32."""
    return any(torch.cpu.get_capabilities().get(name) for name in ("avx512_bf16", "amx_bf16"))


def warn_slow_amp(device: torch.device, amp: bool) -> None:
    """Say so where ``amp`` asks for mixed precision on a CPU that only emulates bfloat16."""
    if amp and device.type == "cpu" and not native_bf16():
        say("warning: train.amp on a CPU without native bfloat16 (AVX512-BF16 or AMX) is emulated "
            "and several times slower than float32; set train.amp: false")
