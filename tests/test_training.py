"""``train_model``, the tutorial's loop: which epoch's weights it keeps, what it records, and
which parts of the model it puts in training mode.

The selection tests use a scripted model whose validation predictions follow a plan per
epoch, so the validation accuracy of every epoch is known in advance and the test can tell
which epoch's state came back.
"""

from __future__ import annotations

import pytest
import torch
from imagefolders import Tensors, loader
from torch import nn
from torch.utils.data import DataLoader

from transfer.training import Progress, set_train_mode, train_model

VAL_SIZE = 4


class Scripted(nn.Module):
    """Predicts, in epoch ``e``, the true class for the first ``plan[e-1]`` validation samples.

    Each validation input is its own index; every training batch (one per epoch) increments
    the ``epoch`` buffer, which is part of the state_dict, so the returned best state says
    which epoch it was copied after. ``bias`` is a real parameter the optimizer updates.
    """

    def __init__(self, plan: list[int]) -> None:
        super().__init__()
        self.plan = plan
        self.bias = nn.Parameter(torch.zeros(2))
        self.register_buffer("epoch", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.epoch += 1
            return self.bias.expand(len(x), 2)
        correct = int(self.plan[int(self.epoch) - 1])
        preds = (x[:, 0] >= correct).long()  # samples 0..correct-1 -> class 0 (right), rest -> 1
        return nn.functional.one_hot(preds, 2).float() * 5 + self.bias


def loaders() -> dict[str, DataLoader]:
    """One training batch per epoch; validation samples are their own indices; all class 0."""
    train = Tensors(torch.zeros(2, 1), [0, 0])
    val = Tensors(torch.arange(VAL_SIZE, dtype=torch.float32).unsqueeze(1), [0] * VAL_SIZE)
    return {"train": loader(train, 2), "val": loader(val, 2)}


def run(plan: list[int], step_size: int = 10, gamma: float = 0.1) -> tuple[Scripted, Progress]:
    model = Scripted(plan)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    result = train_model(model, loaders(), nn.CrossEntropyLoss(reduction="sum"), optimizer, scheduler, len(plan),
                         torch.device("cpu"))
    return model, result


@pytest.mark.parametrize(("plan", "best"), [
    ([2, 4, 4, 2], 2),  # a tie with a later epoch keeps the earlier one
    ([4, 4, 4], 1),  # all equal: the first
    ([1, 2, 3], 3),  # strictly improving: the last
    ([3, 1, 3, 2], 1),  # a later epoch only equals the best
    ([1, 3, 2, 3, 4], 5),  # improvement after a tie
    ([0, 0], 1),  # even at accuracy 0 an epoch is kept (not the initial weights)
])
def test_best_epoch_is_the_first_with_the_highest_val_acc(plan: list[int], best: int) -> None:
    """The tutorial keeps the best validation accuracy; on a tie, the earlier (less trained,
    so less overfit) epoch wins. Several cases fail if ties went to the later epoch."""
    model, result = run(plan)
    assert [r.val_acc for r in result.history] == [n / VAL_SIZE for n in plan]
    assert result.best_epoch == best
    assert result.best_acc == max(plan) / VAL_SIZE
    # The state is the one after that epoch, not the last one's or the initial one's.
    assert int(result.best_state["epoch"]) == best
    assert int(model.epoch) == len(plan)


def test_best_state_is_a_cpu_copy() -> None:
    """Later training (or the caller) must not change the returned weights."""
    model, result = run([4, 1])
    kept = result.best_state["bias"].clone()
    with torch.no_grad():
        model.bias.add_(100)
    assert torch.equal(result.best_state["bias"], kept)
    assert all(t.device.type == "cpu" for t in result.best_state.values())
    # The optimizer did move the parameter during epoch 1, and the copy holds that value.
    assert not torch.equal(kept, torch.zeros(2))


def test_history_records_every_epoch_and_the_learning_rate_schedule() -> None:
    """history.csv is plotted by DVC: one row per epoch, with the lr StepLR used in it."""
    _, result = run([1, 2, 3], step_size=1, gamma=0.5)
    assert [r.epoch for r in result.history] == [1, 2, 3]
    assert [r.lr for r in result.history] == pytest.approx([0.1, 0.05, 0.025])
    first = result.history[0].as_row()
    # No timings in the history: it must be the same file on every rerun (timings go to the run record).
    assert list(first) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]
    assert first["train_loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item())  # zero bias
    assert first["train_acc"] == 1.0  # ties -> class 0
    assert len(result.epoch_seconds) == 3 and result.train_seconds > 0


def test_frozen_backbone_stays_in_eval_mode_while_the_head_trains() -> None:
    """``batchnorm: frozen``: train mode reaches the head only; the tutorial's behaviour
    (``only=None``) puts every layer, BatchNorm included, in train mode."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    head = model[3]
    set_train_mode(model, True, only=head)
    assert [m.training for m in model] == [False, False, False, True]
    set_train_mode(model, False, only=head)
    assert not any(m.training for m in model.modules())
    set_train_mode(model, True)
    assert all(m.training for m in model.modules())
    set_train_mode(model, False)
    assert not any(m.training for m in model.modules())
