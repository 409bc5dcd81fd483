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
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from transfer.datasets import EpochSampler, Pair, loader_options
from transfer.devices import accumulator_dtype, autocast, synchronize
from transfer.distributed import IGNORE, World
from transfer.errors import UserError
from transfer.models import Head
from transfer.strategies import FinetuneRecipe, Recipe


class Steps(Sampler[list[tuple[Pair, bool]]]):
    """The optimisation steps of ``sampler``'s epoch, ``batch_size`` pairs each: this process's
    share of each, as ``(pair, real)`` lists; a process left without an image gets a stand-in
    (``real`` False), so that every process takes every step. ``drop_single``: leave out a
    last step of a single image, on which BatchNorm cannot train."""

    def __init__(self, sampler: EpochSampler, batch_size: int, world: World, drop_single: bool = False) -> None:
        self.sampler, self.batch_size, self.world = sampler, batch_size, world
        self.drop_single = drop_single

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def sizes(self) -> list[int]:
        """The images of each step, over all processes (known without looking at a batch)."""
        full, last = divmod(len(self.sampler), self.batch_size)
        return [self.batch_size] * full + ([last] if last > (1 if self.drop_single else 0) else [])

    def __len__(self) -> int:
        return len(self.sizes())

    def __iter__(self) -> Iterator[list[tuple[Pair, bool]]]:
        pairs = list(self.sampler)
        for start, size in zip(range(0, len(pairs), self.batch_size), self.sizes(), strict=False):
            step = pairs[start:start + size]
            share = self.world.share(step)
            yield [(pair, True) for pair in share] if share else [(step[0], False)]


class Shard(Dataset[tuple[torch.Tensor, int]]):
    """``(pair, real)`` -> the item of ``dataset``, labelled :data:`IGNORE` where not ``real``."""

    def __init__(self, dataset: Dataset[tuple[torch.Tensor, int]]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[Pair, bool]) -> tuple[torch.Tensor, int]:
        pair, real = key
        data, label = self.dataset[pair]
        return data, label if real else IGNORE


def make_loader(dataset: Dataset[tuple[torch.Tensor, int]], sampler: EpochSampler, *, batch_size: int, workers: int,
                device: torch.device, world: World | None = None, drop_single: bool = False) -> DataLoader:
    """The training loop's loader: :class:`Steps` of ``sampler``'s pairs, this process's share."""
    steps = Steps(sampler, batch_size, world or World(), drop_single)
    return DataLoader(Shard(dataset), batch_sampler=steps, **loader_options(workers, device))  # type: ignore[arg-type]


def param_groups(model: nn.Module, head: Head, recipe: Recipe) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: the head at ``recipe.lr``, first (its lr is the one
    the history records), then, for a recipe that trains the backbone, the backbone at
    ``backbone_lr_scale`` times that."""
    head_params = list(model.get_submodule(head.name).parameters())
    groups: list[dict[str, Any]] = [{"params": head_params, "lr": recipe.lr}]
    if isinstance(recipe, FinetuneRecipe):
        ids = {id(p) for p in head_params}
        backbone = [p for p in model.parameters() if id(p) not in ids]
        groups.append({"params": backbone, "lr": recipe.lr * recipe.backbone_lr_scale})
    return groups


@dataclass(frozen=True)
class WarmUp:
    """The first ``epochs`` epochs train the head alone: the backbone's parameters take no
    gradient and its layers stay in eval mode (BatchNorm statistics fixed, as in
    feature_extract); then the backbone joins."""

    epochs: int
    head: nn.Module
    backbone: list[nn.Parameter]

    def frozen(self, epoch: int) -> bool:
        return epoch <= self.epochs

    def apply(self, epoch: int) -> None:
        for param in self.backbone:
            param.requires_grad_(not self.frozen(epoch))


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


@dataclass
class Loop:
    """What the phases of an epoch share."""

    net: nn.Module
    criterion: nn.Module
    device: torch.device
    prepare: Callable[[torch.Tensor], torch.Tensor]
    amp: bool
    world: World
    scaler: torch.amp.GradScaler

    def phase(self, loader: DataLoader, desc: str, optimizer: torch.optim.Optimizer | None) -> tuple[float, float]:
        """One pass over ``loader``, training with ``optimizer`` or validating without one;
        mean loss and accuracy over the phase's images (all processes'). A step's summed
        loss is scaled by ``processes / images in the step``, so that DDP's average of the
        gradients over processes is the mean over the step's images, the tutorial's loss."""
        sizes = loader.batch_sampler.sizes()  # type: ignore[union-attr]
        dtype = accumulator_dtype(self.device)
        loss_sum = torch.zeros((), device=self.device, dtype=dtype)
        corrects = torch.zeros((), device=self.device, dtype=torch.int64)
        counted = torch.zeros((), device=self.device, dtype=torch.int64)
        bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=None if self.world.main else True)
        for step, (inputs, labels) in enumerate(bar):
            inputs, labels = self.prepare(inputs), labels.to(self.device, non_blocking=True)
            grad_mode = torch.enable_grad() if optimizer else torch.inference_mode()
            with grad_mode, autocast(self.device, self.amp):
                outputs = batchnorm_checked(self.net, inputs)
                _, preds = torch.max(outputs, 1)
                loss = self.criterion(outputs, labels)  # summed over this process's images
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss * self.world.size / sizes[step]).backward()
                self.scaler.step(optimizer)
                self.scaler.update()
            loss_sum += loss.detach().to(dtype)
            corrects += torch.sum(preds == labels)
            counted += torch.sum(labels != IGNORE)
        loss_sum, corrects, counted = self.world.sum(loss_sum, corrects, counted)
        total = sum(sizes)
        assert counted.item() == total, f"{desc}: {counted.item()} of {total} images counted"
        return loss_sum.item() / total, corrects.item() / total


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
    progress = start or Progress(best_state=_cpu_copy(model))
    scaler = torch.amp.GradScaler(device.type, enabled=amp and device.type == "cuda")
    if progress.scaler:
        scaler.load_state_dict(progress.scaler)
    prepare = prepare or (lambda batch: batch.to(device, non_blocking=True))
    net, frozen = None, None
    for epoch in range(progress.epoch + 1, num_epochs + 1):
        started = time.perf_counter()
        if net is None or frozen != (warmup is not None and warmup.frozen(epoch)):
            frozen = warmup is not None and warmup.frozen(epoch)
            if warmup is not None:
                warmup.apply(epoch)
            net = world.wrap(model, device)  # DistributedDataParallel over what trains now; the model itself in one
        lr = optimizer.param_groups[0]["lr"]
        loop, stats = Loop(net, criterion, device, prepare, amp, world, scaler), {}
        for phase in ["train", "val"]:
            training = phase == "train"
            set_train_mode(model, training, warmup.head if frozen and warmup else None)
            loaders[phase].batch_sampler.set_epoch(epoch)  # type: ignore[union-attr]
            stats[phase] = loop.phase(loaders[phase], f"epoch {epoch}/{num_epochs} {phase}",
                                      optimizer if training else None)
            if training:
                scheduler.step()
                world.broadcast_buffers(model)  # every process validates process 0's model
                synchronize(device)
                progress.train_seconds += time.perf_counter() - started
        record = EpochRecord(epoch, *stats["train"], *stats["val"], lr)
        if not all(map(math.isfinite, (record.train_loss, record.val_loss))):
            raise Diverged(f"the loss became {record.train_loss:g} (validation: {record.val_loss:g}) in epoch {epoch}")
        _end_epoch(progress, model, record, time.perf_counter() - started, scaler)
        if on_epoch is not None:
            on_epoch(progress)
        if world.main:
            tqdm.write(f"Epoch {epoch}/{num_epochs}  train loss {record.train_loss:.4f} acc {record.train_acc:.4f}  "
                       f"val loss {record.val_loss:.4f} acc {record.val_acc:.4f}  lr {lr:.2g}  "
                       f"{progress.epoch_seconds[-1]:.1f}s" + ("  *best" if progress.best_epoch == epoch else ""))
    return progress


def _end_epoch(progress: Progress, model: nn.Module, record: EpochRecord, seconds: float,
               scaler: torch.amp.GradScaler) -> None:
    progress.epoch = record.epoch
    progress.history.append(record)
    progress.epoch_seconds.append(seconds)
    progress.scaler = scaler.state_dict()
    if record.val_acc > progress.best_acc:  # strictly better: ties keep the earlier epoch
        progress.best_acc, progress.best_epoch = record.val_acc, record.epoch
        progress.best_state = _cpu_copy(model)


def images_per_second(progress: Progress, loader: DataLoader) -> float:
    """Training images per second of training-phase time, over the epochs this run trained."""
    return sum(loader.batch_sampler.sizes()) * len(progress.history)  # type: ignore[union-attr] / progress.train_seconds if progress.train_seconds else 0.0


def _cpu_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
