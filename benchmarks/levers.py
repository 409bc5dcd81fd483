"""Micro-benchmark of the speed levers, one at a time, on synthetic batches.

Why it exists: ``speed.py`` measures what a user pays for whole stages; this measures the
ceiling those stages sit under (a ResNet18 step at batch 4, a forward pass at the inference
batch size) and what each lever the speed issue names does to it on this machine: fp32,
channels_last, bf16 autocast (emulated where the CPU has no native bf16), torch.compile and a
frozen TorchScript graph for inference. Random weights and random pixels: the arithmetic is
the same as with real ones.

usage: .venv/bin/python benchmarks/levers.py [--seconds 20] [--train-batch 4]
       [--inference-batch 16] [--compile]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from transfer.devices import autocast, configure_threads, native_bf16

CPU = torch.device("cpu")


def rate(step: Callable[[], None], images: int, seconds: float) -> float:
    """Images per second of ``step`` after two warm-up calls, over about ``seconds``."""
    step()
    step()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        done += images
    return done / (time.perf_counter() - start)


def variants(args: argparse.Namespace) -> Iterator[tuple[str, bool, bool, str]]:
    """(name, channels_last, bf16, how) of each measured variant."""
    yield "fp32", False, False, "eager"
    yield "fp32 channels_last", True, False, "eager"
    yield "bf16 autocast channels_last", True, True, "eager"
    if args.compile:
        yield "fp32 torch.compile", False, False, "compile"
    yield "fp32 TorchScript freeze", False, False, "jit"


def measure(args: argparse.Namespace, channels_last: bool, bf16: bool, how: str) -> tuple[float | None, float]:
    """Training and inference images per second of one variant (no training figure for ``jit``)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = torchvision.models.resnet18(num_classes=2).to(memory_format=fmt)
    x_train = torch.rand(args.train_batch, 3, 224, 224).to(memory_format=fmt)
    y_train = torch.randint(0, 2, (args.train_batch,))
    x_infer = torch.rand(args.inference_batch, 3, 224, 224).to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    run_model = torch.compile(model) if how == "compile" else model

    def train_step() -> None:
        optimizer.zero_grad()
        with autocast(CPU, bf16):
            loss = loss_fn(run_model(x_train), y_train)
        loss.backward()
        optimizer.step()

    train = None if how == "jit" else rate(train_step, args.train_batch, args.seconds)
    model.eval()
    with torch.inference_mode():
        if how == "jit":
            with warnings.catch_warnings(category=FutureWarning, action="ignore"):  # deprecated, measured anyway
                run_model = torch.jit.freeze(torch.jit.trace(model, x_infer))

        def infer_step() -> None:
            with autocast(CPU, bf16):
                run_model(x_infer)

        infer = rate(infer_step, args.inference_batch, args.seconds)
    return train, infer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per measurement")
    p.add_argument("--train-batch", type=int, default=4, help="the tutorial's batch size")
    p.add_argument("--inference-batch", type=int, default=16, help="runtime.inference_batch_size")
    p.add_argument("--compile", action="store_true", help="also torch.compile (about 30 s of compiling each)")
    args = p.parse_args(argv)
    threads = configure_threads("auto")
    print(f"torch {torch.__version__}, {threads} threads, native bf16: {native_bf16()}, "
          f"{args.seconds:.0f} s per figure")
    print(f"{'variant':38} {'train img/s':>12} {'inference img/s':>16}")
    torch.manual_seed(0)
    for name, channels_last, bf16, how in variants(args):
        train, infer = measure(args, channels_last, bf16, how)
        print(f"{name:38} {'' if train is None else f'{train:.1f}':>12} {infer:16.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
