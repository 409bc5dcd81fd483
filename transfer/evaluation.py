"""Running a trained classifier over a data set and scoring what it predicted."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from transfer.devices import accumulator_dtype


class Predictions(NamedTuple):
    labels: torch.Tensor         # (N,) true class indices
    probabilities: torch.Tensor  # (N, C) softmax outputs
    predicted: torch.Tensor      # (N,) the most probable class (the first of equals)
    confidence: torch.Tensor     # (N,) its probability
    mean_loss: float


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, device: torch.device,
            prepare: Callable[[torch.Tensor], torch.Tensor], desc: str) -> Predictions:
    """One pass over ``loader`` in eval mode, in the loader's order; ``prepare`` turns a
    batch into the model's input on ``device``."""
    model.eval()
    labels, probabilities = [], []
    total_loss = torch.zeros((), dtype=accumulator_dtype(device), device=device)
    for inputs, targets in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        labels.append(targets)
        logits = model(prepare(inputs)).float()
        total_loss += nn.functional.cross_entropy(logits, targets.to(device, non_blocking=True),
                                                  reduction="sum")  # in total_loss's dtype
        probabilities.append(logits.softmax(dim=1).cpu())
    probs = torch.cat(probabilities)  # fails on an empty loader, as the mean loss would
    confidence, predicted = probs.max(dim=1)
    return Predictions(torch.cat(labels), probs, predicted, confidence, total_loss.item() / len(probs))


class Report(NamedTuple):
    accuracy: float
    images: int
    per_class: dict[str, dict[str, float]]  #: class -> precision, recall, f1, support
    macro: dict[str, float]  #: the averages of precision, recall and f1 over the classes


def classification_report(labels: torch.Tensor, predicted: torch.Tensor, classes: list[str]) -> Report:
    """Accuracy, per-class precision/recall/F1/support and their macro averages.

    A ratio with a zero denominator (a class never predicted, say) counts as 0, as
    scikit-learn's ``zero_division=0`` does: its numerator (true positives) is 0 then too, so
    dividing by the denominator clamped to 1 gives that 0.
    """
    true_pos, support, guessed = (torch.bincount(t, minlength=len(classes)).double()
                                  for t in (labels[labels == predicted], labels, predicted))
    scores = {"precision": true_pos / guessed.clamp(min=1), "recall": true_pos / support.clamp(min=1),
              "f1": 2 * true_pos / (support + guessed).clamp(min=1)}  # 2TP / (2TP + FP + FN)
    macro = {k: v.mean().item() for k, v in scores.items()}
    scores["support"] = support.long()  # whose items are ints
    per_class = {name: {k: v[i].item() for k, v in scores.items()} for i, name in enumerate(classes)}
    return Report(true_pos.sum().item() / max(len(labels), 1), len(labels), per_class, macro)
