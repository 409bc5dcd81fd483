"""The training loop of PyTorch's transfer-learning tutorial (``train_model``), kept recognisable:
each epoch a training and a validation phase, the best validation accuracy's weights kept
(docs/training.md says where it differs from the tutorial, and why).

Beside it, what walks an epoch: :class:`Steps`, whose order and views follow the seed and the
epoch, shared among processes. The loop sums losses on the device so that no batch waits for
the host, and trains a whole network on images or a lone head on stored features alike.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from transfer.datasets import EpochSampler, Pair, loader_options
from transfer.devices import accumulator_dtype, autocast, synchronize
from transfer.distributed import IGNORE, World
from transfer.errors import UserError


@dataclass
class Steps(Sampler[list[tuple[Pair, bool]]]):
    """The optimisation steps of ``sampler``'s epoch, ``batch_size`` pairs each: this process's
    share of each, as ``(pair, real)`` lists; a process left without an image gets a stand-in
    (``real`` False), so that every process takes every step. ``drop_single``: leave out a
    last step of a single image, on which BatchNorm cannot train."""

    sampler: EpochSampler
    batch_size: int
    world: World
    drop_single: bool = False

    def sizes(self) -> list[int]:
        """The images of each step, over all processes (known without looking at a batch)."""
        full, last = divmod(len(self.sampler), self.batch_size)
        return [self.batch_size] * full + ([last] if last > (1 if self.drop_single else 0) else [])

    def __len__(self) -> int:
        return len(self.sizes())

    def __iter__(self) -> Iterator[list[tuple[Pair, bool]]]:
        pairs = iter(self.sampler)
        for size in self.sizes():
            step = list(islice(pairs, size))
            share = self.world.share(step)
            yield [(pair, True) for pair in share] if share else [(step[0], False)]


@dataclass
class Shard(Dataset[tuple[torch.Tensor, int]]):
    """``(pair, real)`` -> the item of ``dataset``, labelled :data:`IGNORE` where not ``real``
    (the loader's length is its :class:`Steps`', so it needs no length of its own)."""

    dataset: Dataset[tuple[torch.Tensor, int]]

    def __getitem__(self, key: tuple[Pair, bool]) -> tuple[torch.Tensor, int]:
        pair, real = key
        data, label = self.dataset[pair]
        return data, label if real else IGNORE


def make_loader(dataset: Dataset[tuple[torch.Tensor, int]], sampler: EpochSampler, *, batch_size: int, workers: int,
                device: torch.device, world: World | None = None, drop_single: bool = False) -> DataLoader:
    """The training loop's loader: :class:`Steps` of ``sampler``'s pairs, this process's share."""
    return DataLoader(Shard(dataset), batch_sampler=Steps(sampler, batch_size, world or World(), drop_single),
                      **loader_options(workers, device))  # type: ignore[arg-type]


@dataclass(frozen=True)
class WarmUp:
    """The first ``epochs`` epochs train the head alone: the backbone's parameters take no
    gradient and its layers stay in eval mode (BatchNorm statistics fixed, as in
    feature_extract); then the backbone joins."""

    epochs: int
    head: nn.Module
    backbone: list[nn.Parameter]


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    lr: float

    def as_row(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class Progress:
    """The loop's own state after ``epoch``: with the model's, optimizer's, scheduler's and random
    generators' states, what a run needs to carry on as if it had never stopped."""

    epoch: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[EpochRecord] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    train_seconds: float = 0.0
    scaler: dict[str, Any] = field(default_factory=dict)  # the AMP GradScaler's state_dict (empty when disabled)


class Diverged(Exception):
    """The loss of an epoch is not a finite number: training cannot recover from that."""


def set_train_mode(model: nn.Module, training: bool, only: nn.Module | None = None) -> None:
    """``model.train()`` or ``model.eval()``; with ``only``, train mode reaches just that part:
    a frozen backbone stays in eval mode, so its BatchNorm statistics stay the pretrained ones."""
    model.train(training and only is None)
    if training and only is not None:
        only.train()


def batchnorm_checked(net: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """``net(inputs)``, with BatchNorm's refusal of a single value per channel (one image
    at a small crop, in training) said in a user's terms."""
    try:
        return net(inputs)
    except ValueError as exc:
        if "Expected more than 1 value per channel" not in str(exc):
            raise
        raise UserError(f"a training step of {len(inputs)} image(s) per process leaves BatchNorm one value per "
                        "channel at this crop size: raise train.batch_size (to 2 or more per process) or "
                        "preprocess.crop") from None


def train_model(
    model: nn.Module,
    loaders: dict[str, DataLoader],
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    num_epochs: int,
    device: torch.device,
    *,
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None,
    amp: bool = False,
    warmup: WarmUp | None = None,
    start: Progress | None = None,
    on_epoch: Callable[[Progress], None] | None = None,
    world: World | None = None,
) -> Progress:
    """Train for ``num_epochs``; return the progress (the best epoch's weights on the CPU, the
    history). ``prepare`` turns a batch into the model's input on ``device``; ``criterion``
    sums over a batch; ``warmup``: epochs training the head alone; ``start``: an interrupted
    run's progress (the caller restored the rest); ``on_epoch`` gets the progress after every
    epoch. Raises :class:`Diverged` for a non-finite loss."""
    world = world or World()
    progress = start or Progress()  # best_acc -1: epoch 1's state replaces the empty best_state
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    if progress.scaler:
        scaler.load_state_dict(progress.scaler)
    prepare = prepare or (lambda batch: batch.to(device, non_blocking=True))
    dtype = accumulator_dtype(device)
    net, was_frozen = model, None
    for epoch in range(progress.epoch + 1, num_epochs + 1):
        started = time.perf_counter()
        frozen = warmup is not None and epoch <= warmup.epochs
        if frozen != was_frozen:  # the first epoch, and the one the backbone joins in
            was_frozen = frozen
            for param in warmup.backbone if warmup else ():
                param.requires_grad_(not frozen)
            net = world.wrap(model, device)  # DistributedDataParallel over what trains now; the model itself in one
        lr = optimizer.param_groups[0]["lr"]
        stats: list[float] = []
        for phase in ["train", "val"]:
            training = phase == "train"
            set_train_mode(model, training, warmup.head if frozen and warmup else None)
            steps: Steps = loaders[phase].batch_sampler  # type: ignore[assignment]
            steps.sampler.set_epoch(epoch)
            sizes = steps.sizes()
            # Summed on the device, so that no step waits for the host.
            running_loss = torch.zeros((), device=device, dtype=dtype)
            running_corrects, counted = torch.zeros(2, device=device, dtype=torch.int64)
            desc = f"epoch {epoch}/{num_epochs} {phase}"
            for step, (inputs, labels) in enumerate(tqdm(loaders[phase], desc=desc, unit="batch", leave=False,
                                                         disable=None if world.main else True)):
                inputs, labels = prepare(inputs), labels.to(device, non_blocking=True)
                with torch.enable_grad() if training else torch.inference_mode(), autocast(device, amp):
                    outputs = batchnorm_checked(net, inputs)
                    _, preds = torch.max(outputs, 1)
                    loss = criterion(outputs, labels)  # summed over this process's images
                if training:
                    # Scaled by processes / images in the step: DDP's average of the gradients
                    # over processes is then the mean over the step's images, the tutorial's loss.
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss * world.size / sizes[step]).backward()
                    scaler.step(optimizer)
                    scaler.update()
                running_loss += loss.detach().to(dtype)
                running_corrects += torch.sum(preds == labels)
                counted += torch.sum(labels != IGNORE)
            running_loss, running_corrects, counted = world.sum(running_loss, running_corrects, counted)
            total = sum(sizes)
            assert counted.item() == total, f"{desc}: {counted.item()} of {total} images counted"
            stats += [running_loss.item() / total, running_corrects.item() / total]
            if training:
                scheduler.step()
                world.broadcast_buffers(model)  # every process validates process 0's model
                synchronize(device)
                progress.train_seconds += time.perf_counter() - started
        record = EpochRecord(epoch, *stats, lr)
        if not all(map(math.isfinite, (record.train_loss, record.val_loss))):
            raise Diverged(f"the loss became {record.train_loss:g} (validation: {record.val_loss:g}) in epoch {epoch}")
        progress.epoch = epoch
        progress.history.append(record)
        progress.epoch_seconds.append(time.perf_counter() - started)
        progress.scaler = scaler.state_dict()
        if record.val_acc > progress.best_acc:  # strictly better: ties keep the earlier epoch
            progress.best_acc, progress.best_epoch = record.val_acc, epoch
            progress.best_state = cpu_state(model)
        if on_epoch is not None:
            on_epoch(progress)
        if world.main:
            tqdm.write(f"Epoch {epoch}/{num_epochs}  train loss {record.train_loss:.4f} acc {record.train_acc:.4f}  "
                       f"val loss {record.val_loss:.4f} acc {record.val_acc:.4f}  lr {lr:.2g}  "
                       f"{progress.epoch_seconds[-1]:.1f}s" + ("  *best" if progress.best_epoch == epoch else ""))
    return progress


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model``'s state on the CPU, which later training leaves as it is."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
