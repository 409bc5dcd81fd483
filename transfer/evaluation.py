"""Running a trained classifier over a data set and scoring what it predicted."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from transfer.devices import accumulator_dtype


@dataclass
class Predictions:
    labels: torch.Tensor         # (N,) true class indices
    probabilities: torch.Tensor  # (N, C) softmax outputs
    mean_loss: float

    @property
    def predicted(self) -> torch.Tensor:
        return self.probabilities.argmax(dim=1)

    @property
    def confidence(self) -> torch.Tensor:
        return self.probabilities.max(dim=1).values


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, device: torch.device,
            prepare: Callable[[torch.Tensor], torch.Tensor] | None = None, desc: str = "evaluate") -> Predictions:
    """One pass over ``loader`` in eval mode, in the loader's order; ``prepare`` turns a
    batch into the model's input on ``device`` (default: moves it there)."""
    prepare = prepare or (lambda batch: batch.to(device, non_blocking=True))
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    labels, probabilities = [], []
    total_loss = torch.zeros((), dtype=accumulator_dtype(device), device=device)
    for inputs, targets in tqdm(loader, desc=desc, unit="batch", leave=False, disable=None):
        inputs, targets = prepare(inputs), targets.to(device, non_blocking=True)
        logits = model(inputs).float()
        total_loss += criterion(logits, targets).to(total_loss.dtype)
        labels.append(targets.cpu())
        probabilities.append(logits.softmax(dim=1).cpu())
    count = sum(len(t) for t in labels)
    return Predictions(torch.cat(labels), torch.cat(probabilities), total_loss.item() / max(count, 1))


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``matrix[actual, predicted]`` counts."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


@dataclass(frozen=True)
class Report:
    accuracy: float
    images: int
    per_class: dict[str, dict[str, float]]  #: class -> precision, recall, f1, support
    macro: dict[str, float]  #: the averages of precision, recall and f1 over the classes


def classification_report(labels: torch.Tensor, predicted: torch.Tensor, classes: list[str]) -> Report:
    """Accuracy, per-class precision/recall/F1/support and their macro averages.

    A ratio with a zero denominator (a class never predicted, say) counts as 0, as
    scikit-learn's ``zero_division=0`` does.
    """
    matrix = confusion_matrix(labels, predicted, len(classes)).double()
    true_pos = matrix.diag()
    support = matrix.sum(dim=1)
    predicted_count = matrix.sum(dim=0)
    precision = torch.where(predicted_count > 0, true_pos / predicted_count.clamp(min=1), 0.0)
    recall = torch.where(support > 0, true_pos / support.clamp(min=1), 0.0)
    both = support + predicted_count  # 2TP + FP + FN
    f1 = torch.where(both > 0, 2 * true_pos / both.clamp(min=1), 0.0)
    per_class = {
        name: {"precision": precision[i].item(), "recall": recall[i].item(),
               "f1": f1[i].item(), "support": int(support[i].item())}
        for i, name in enumerate(classes)
    }
    total = int(matrix.sum().item())
    return Report(true_pos.sum().item() / total if total else 0.0, total, per_class,
                  {"precision": precision.mean().item(), "recall": recall.mean().item(), "f1": f1.mean().item()})
