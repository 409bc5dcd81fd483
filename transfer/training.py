"""The training loop of PyTorch's transfer-learning tutorial (``train_model``), kept recognisable.

Each epoch has a training and a validation phase; the model with the best validation
accuracy is kept. Improvements over the tutorial: a progress bar per phase; batches arrive as
uint8 pixels (or stored features) and are prepared on the device; each epoch's order and
augmentation follow the seed and the epoch (the loaders' :class:`~transfer.data.EpochSampler`);
validation runs under ``torch.inference_mode()``; losses are summed on the device (no host
sync per batch); optional mixed precision; a history row per epoch, handed to ``on_epoch``
with the rest of the loop's :class:`Progress` as soon as the epoch ends, and a run can
``start`` from such a progress to resume (see :mod:`transfer.resume`); ties in accuracy go to
the earlier epoch; and a frozen backbone can keep its BatchNorm statistics fixed.

The same loop trains a whole network on images and a lone head on the frozen backbone's
precomputed outputs: only the model and what ``prepare`` does to a batch differ.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from transfer.data import set_epoch
from transfer.devices import accumulator_dtype, synchronize
from transfer.distributed import IGNORE, World


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
    """The loop's own state after ``epoch``: with the model's, the optimizer's and the
    scheduler's state (and the random generators'), all a run needs to carry on from there
    exactly as if it had never stopped."""

    epoch: int
    best_acc: float
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    history: list[EpochRecord]
    epoch_seconds: list[float]
    train_seconds: float
    scaler: dict[str, Any]  # the AMP GradScaler's state_dict (empty when it is disabled)


@dataclass
class TrainResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_acc: float
    history: list[EpochRecord]
    epoch_seconds: list[float]
    train_images_per_second: float


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Mixed precision: float16 on CUDA, bfloat16 elsewhere; a no-op when disabled."""
    if not enabled:
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_train_mode(model: nn.Module, training: bool, only: nn.Module | None = None) -> None:
    """``model.train()`` or ``model.eval()``; with ``only``, train mode reaches just that part.

    For a frozen backbone, ``only`` is the new head: the backbone stays in eval mode, so its
    BatchNorm running statistics stay those of the pretrained weights and its features are a
    fixed function of the image, which is what a "fixed feature extractor" means. The
    tutorial calls ``model.train()`` on the whole model and lets those statistics drift.
    """
    model.train(training and only is None)
    if training and only is not None:
        only.train()


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
    train_only: nn.Module | None = None,
    amp: bool = False,
    start: Progress | None = None,
    on_epoch: Callable[[Progress], None] | None = None,
    log: bool = True,
    world: World | None = None,
) -> TrainResult:
    """Train for ``num_epochs``; return the best epoch's weights (on the CPU) and the history.

    ``prepare`` turns a loader's batch into the model's input on ``device`` (default: move
    it there). ``train_only``: the submodule put in training mode during the training phase,
    the rest staying in eval mode (see :func:`set_train_mode`); None trains the whole
    model's modes. ``on_epoch`` gets the progress after every epoch (to write the history
    out and save what resuming needs). ``start``: the progress of an interrupted run, whose
    model, optimizer, scheduler and random generators the caller has restored; training
    goes on with the epoch after ``start.epoch``.

    ``criterion`` sums over a batch (``reduction="sum"``): each step's gradient is that sum
    divided by the step's number of images, the tutorial's mean loss. ``world``: several
    processes training as one (see :mod:`transfer.distributed`); each gets its share of
    every batch from its loaders, and the sums and counts cover all of them.
    """
    world = world or World()
    prepare = prepare or (lambda batch: batch.to(device, non_blocking=True))
    net = world.wrap(model, device)  # DistributedDataParallel across processes; the model itself in one
    dataset_sizes = {phase: len(loader.dataset) for phase, loader in loaders.items()}  # type: ignore[arg-type]
    batch_size = loaders["train"].batch_sampler.batch_size  # type: ignore[union-attr]  # images per step, all processes
    total = accumulator_dtype(device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    best_state = _cpu_copy(model)
    best_acc, best_epoch = -1.0, 0
    history: list[EpochRecord] = []
    epoch_seconds: list[float] = []
    train_seconds = 0.0
    done = 0
    if start is not None:  # resuming: carry on where the interrupted run's last epoch ended
        done, best_acc, best_epoch, best_state = start.epoch, start.best_acc, start.best_epoch, start.best_state
        history, epoch_seconds, train_seconds = list(start.history), list(start.epoch_seconds), start.train_seconds
        if start.scaler:
            scaler.load_state_dict(start.scaler)

    for epoch in range(done + 1, num_epochs + 1):
        started = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        stats: dict[str, tuple[float, float]] = {}
        for phase in ["train", "val"]:
            training = phase == "train"
            set_train_mode(model, training, train_only)
            set_epoch(loaders[phase], epoch)
            phase_start = time.perf_counter()
            running_loss = torch.zeros((), device=device, dtype=total)
            running_corrects = torch.zeros((), device=device, dtype=torch.int64)
            running_images = torch.zeros((), device=device, dtype=torch.int64)

            bar = tqdm(loaders[phase], desc=f"epoch {epoch}/{num_epochs} {phase}", unit="batch",
                       leave=False, disable=None if world.main else True)
            for step, (inputs, labels) in enumerate(bar):
                inputs = prepare(inputs)
                labels = labels.to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=True)

                grad_mode = torch.enable_grad() if training else torch.inference_mode()
                with grad_mode, autocast(device, amp):
                    outputs = net(inputs)
                    _, preds = torch.max(outputs, 1)
                    loss = criterion(outputs, labels)  # summed over this process's images

                if training:  # the mean over the step's images (DDP averages over processes)
                    step_images = min(batch_size, dataset_sizes[phase] - step * batch_size)
                    scaler.scale(loss * world.size / step_images).backward()
                    scaler.step(optimizer)
                    scaler.update()

                running_loss += loss.detach().to(total)
                running_corrects += torch.sum(preds == labels)
                running_images += torch.sum(labels != IGNORE)
            if training:
                scheduler.step()
                world.broadcast_buffers(model)  # every process validates process 0's model
                synchronize(device)
                train_seconds += time.perf_counter() - phase_start

            running_loss, running_corrects, running_images = world.sum(running_loss, running_corrects,
                                                                       running_images)
            size = dataset_sizes[phase]
            assert running_images.item() == size, f"{phase}: {running_images.item()} of {size} images counted"
            stats[phase] = (running_loss.item() / size, running_corrects.item() / size)

        (train_loss, train_acc), (val_loss, val_acc) = stats["train"], stats["val"]
        record = EpochRecord(epoch, train_loss, train_acc, val_loss, val_acc, lr)
        history.append(record)
        epoch_seconds.append(time.perf_counter() - started)
        if val_acc > best_acc:  # strictly better: ties keep the earlier epoch
            best_acc, best_epoch = val_acc, epoch
            best_state = _cpu_copy(model)
        if on_epoch is not None:
            on_epoch(Progress(epoch, best_acc, best_epoch, best_state, list(history), list(epoch_seconds),
                              train_seconds, scaler.state_dict()))
        if log and world.main:
            tqdm.write(
                f"Epoch {epoch}/{num_epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                f"val loss {val_loss:.4f} acc {val_acc:.4f}  lr {lr:.2g}  {epoch_seconds[-1]:.1f}s"
                + ("  *best" if best_epoch == epoch else "")
            )
    images_per_second = dataset_sizes["train"] * len(history) / train_seconds if train_seconds else 0.0
    return TrainResult(best_state, best_epoch, best_acc, history, epoch_seconds, images_per_second)


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
