"""The evaluation numbers, checked against a confusion matrix counted by hand.

``transfer.evaluation`` computes everything ``metrics/<mode>/eval.json`` reports, so its
arithmetic is pinned here on a fixed tiny set whose every number was worked out on paper:
which axis of the matrix is "actual", precision versus recall, F1 as their harmonic mean,
unweighted macro averages over every class, and a zero denominator (a class never
predicted, a class with no images) counting as 0 instead of NaN or a crash.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transfer.evaluation import classification_report, predict
from transfer.statistics import wilson_interval

CLASSES = ["ants", "bees", "wasps"]
# Ten images: 4 ants, 3 bees, 3 wasps. Nothing is ever predicted "wasps".
LABELS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
PREDICTED = torch.tensor([0, 0, 1, 0, 1, 1, 0, 0, 1, 0])
# Counted by hand, rows = actual, columns = predicted:
#            ants bees wasps
#   ants       3    1    0     support 4
#   bees       1    2    0     support 3
#   wasps      2    1    0     support 3
#   predicted  6    4    0
HAND_MATRIX = [[3, 1, 0], [1, 2, 0], [2, 1, 0]]


def test_rows_are_actual_columns_predicted() -> None:
    """The counts behind the report are the matrix above: support is a row's sum (actual),
    precision's denominator a column's (predicted), the true positives its diagonal; an
    asymmetric case tells the axes apart."""
    report = classification_report(LABELS, PREDICTED, CLASSES)
    assert report.images == sum(map(sum, HAND_MATRIX)) == len(LABELS)
    for i, name in enumerate(CLASSES):
        row, column, right = sum(HAND_MATRIX[i]), sum(r[i] for r in HAND_MATRIX), HAND_MATRIX[i][i]
        numbers = report.per_class[name]
        assert numbers["support"] == row, name
        assert numbers["recall"] == pytest.approx(right / row), name
        assert numbers["precision"] == pytest.approx(right / column if column else 0.0), name
    one = classification_report(torch.tensor([2]), torch.tensor([0]), CLASSES).per_class  # a wasp called an ant
    assert [one[name]["support"] for name in CLASSES] == [0, 0, 1]
    assert one["ants"]["precision"] == one["wasps"]["recall"] == 0.0


def test_report_matches_hand_computed_numbers() -> None:
    """Every number of the report, against the matrix above worked out by hand.

    ants:  precision 3/6 = 0.5, recall 3/4 = 0.75, F1 = 2*0.5*0.75/1.25 = 0.6
    bees:  precision 2/4 = 0.5, recall 2/3,        F1 = 2*0.5*(2/3)/(0.5+2/3) = 4/7
    wasps: never predicted: precision 0/0 -> 0, recall 0/3 = 0, F1 0
    macro: precision (0.5+0.5+0)/3 = 1/3, recall (0.75+2/3+0)/3 = 17/36,
           F1 (0.6+4/7+0)/3 = 41/105; accuracy (3+2+0)/10 = 0.5
    """
    report = classification_report(LABELS, PREDICTED, CLASSES)
    assert report.images == 10
    assert report.accuracy == pytest.approx(0.5)
    expected = {
        "ants": {"precision": 0.5, "recall": 0.75, "f1": 0.6, "support": 4},
        "bees": {"precision": 0.5, "recall": 2 / 3, "f1": 4 / 7, "support": 3},
        "wasps": {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3},
    }
    per_class = report.per_class
    assert isinstance(per_class, dict)
    assert list(per_class) == CLASSES
    for name, numbers in expected.items():
        assert per_class[name] == pytest.approx(numbers), name
        assert isinstance(per_class[name]["support"], int)
    assert report.macro == pytest.approx({"precision": 1 / 3, "recall": 17 / 36, "f1": 41 / 105})
    for value in (*report.macro.values(), *(v for n in per_class.values() for v in n.values())):
        assert math.isfinite(value)


def test_class_without_images_counts_as_zero_in_the_macro_average() -> None:
    """A class with no images and no predictions scores 0 (scikit-learn's zero_division=0)
    and still counts in the unweighted macro average, which is then visibly pulled down.

    Two ants right, one bee right, one bee called an ant; no wasps at all.
    ants: precision 2/3, recall 1, F1 0.8; bees: precision 1, recall 1/2, F1 2/3.
    """
    report = classification_report(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 0]), CLASSES)
    assert report.accuracy == pytest.approx(0.75)
    assert report.per_class["wasps"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report.per_class["ants"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8,
                                                         "support": 2})
    assert report.macro == pytest.approx({"precision": 5 / 9, "recall": 1 / 2, "f1": 22 / 45})


def test_class_predicted_but_absent_scores_zero() -> None:
    """Predicting a class that has no images: its precision is 0/1, its recall 0/0 -> 0."""
    report = classification_report(torch.tensor([0, 1]), torch.tensor([2, 1]), CLASSES)
    assert report.per_class["wasps"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report.per_class["ants"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report.accuracy == pytest.approx(0.5)


def test_empty_set_reports_zeros_not_nan() -> None:
    """No images at all: zeros everywhere, no division by zero."""
    report = classification_report(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long),
                                   CLASSES)
    assert report.images == 0 and report.accuracy == 0.0
    assert report.macro == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


class Logits(nn.Module):
    """A "model" whose inputs are already its logits, so the expected outputs are exact."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_predict_keeps_order_and_averages_loss_per_image() -> None:
    """``predict`` keeps the loader's order, returns softmax probabilities, and averages the
    loss over images, not batches (the last batch here holds one image, not two).

    Logits (0, 0), (ln 3, 0), (0, ln 3) give probabilities (1/2, 1/2), (3/4, 1/4), (1/4, 3/4);
    with labels 0, 1, 1 the losses are ln 2, ln 4 and ln(4/3).
    """
    ln3 = math.log(3)
    inputs = torch.tensor([[0.0, 0.0], [ln3, 0.0], [0.0, ln3]])
    labels = torch.tensor([0, 1, 1])
    model = nn.Sequential(nn.Dropout(p=0.5), Logits())
    model.train()
    loader = DataLoader(TensorDataset(inputs, labels), batch_size=2, shuffle=False)
    preds = predict(model, loader, torch.device("cpu"), lambda batch: batch, "test")
    assert not model.training, "evaluation must run in eval mode (no dropout, fixed BatchNorm)"
    assert preds.labels.tolist() == [0, 1, 1]
    assert preds.probabilities.flatten().tolist() == pytest.approx([0.5, 0.5, 0.75, 0.25, 0.25, 0.75])
    assert preds.predicted.tolist() == [0, 0, 1]
    assert preds.confidence.tolist() == pytest.approx([0.5, 0.75, 0.75])
    assert preds.mean_loss == pytest.approx((math.log(2) + math.log(4) + math.log(4 / 3)) / 3)


@pytest.mark.parametrize(("correct", "total", "low", "high"), [
    (6, 9, 0.3542, 0.8794),    # published values of the Wilson score interval at 95%
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (140, 153, 0.8601, 0.9497),  # 140 of the real data set's 153 validation images
])
def test_wilson_interval(correct: int, total: int, low: float, high: float) -> None:
    """The 95% interval of an accuracy, as statistics tables give it; never outside [0, 1]."""
    assert wilson_interval(correct, total) == pytest.approx((low, high), abs=1e-4)


def test_wilson_interval_narrows_with_more_images() -> None:
    """Ten times the images at the same accuracy: a much narrower interval (about 1/sqrt(10))."""
    small, large = wilson_interval(90, 100), wilson_interval(900, 1000)
    assert small[0] < large[0] < 0.9 < large[1] < small[1]
    assert (large[1] - large[0]) < 0.4 * (small[1] - small[0])
