"""Figures of images with their labels: the tutorial's ``imshow`` and ``visualize_model``.

Matplotlib runs with the non-interactive Agg backend; figures are saved atomically and
never shown, so the stages work on servers and in CI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from transfer.atomic import atomic_path

if TYPE_CHECKING:  # for an annotation: torch costs the compare stage 1.5 s to import
    import torch


def save_image_grid(
    path: Path,
    images: Sequence[torch.Tensor],
    titles: Sequence[str],
    *,
    mistakes: Sequence[bool] | None = None,
    suptitle: str = "",
    columns: int = 4,
) -> None:
    """Save a grid of images (uint8 CHW, as the model saw them before normalisation) with a
    title each; ``mistakes`` get a red frame and title."""
    count = max(len(images), 1)
    cols = min(columns, count)
    rows = math.ceil(count / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.6 * rows + (0.4 if suptitle else 0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not images:
        axes[0, 0].text(0.5, 0.5, "nothing to show", ha="center", va="center", fontsize=14)
    for i, (image, title) in enumerate(zip(images, titles, strict=True)):
        ax = axes.flat[i]
        ax.imshow(image.permute(1, 2, 0).cpu().numpy())
        ax.set_title(title, fontsize=10)
        if mistakes is None:
            continue
        colour = "tab:red" if mistakes[i] else "tab:green"  # matplotlib's default red and green
        ax.title.set(color=colour, fontweight="bold" if mistakes[i] else "normal")
        ax.axis("on")
        ax.set(xticks=[], yticks=[])
        plt.setp(ax.spines.values(), edgecolor=colour, linewidth=4 if mistakes[i] else 1)
    if suptitle:
        fig.suptitle(suptitle)
    save_png(fig, path)


def save_table(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> None:
    """Save a table of text as a picture (for ``dvc plots show``, which shows images as they are)."""
    fig, ax = plt.subplots(figsize=(2.2 * len(header), 0.45 * (len(rows) + 2) + 0.4))
    ax.axis("off")
    table = ax.table(cellText=rows or [[""] * len(header)], colLabels=header, loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.auto_set_column_width(range(len(header)))
    ax.set_title(title)
    save_png(fig, path)


def save_png(fig: plt.Figure, path: Path) -> None:
    """Write ``fig`` as a PNG atomically and free it; no software tag in the metadata, so that
    reruns write the same bytes (DVC then sees an unchanged output)."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80, metadata={"Software": None})
    plt.close(fig)


def save_sweep(path: Path, xs: Sequence[str], series: dict[str, dict[int, Any]], xlabel: str, title: str) -> None:
    """Each strategy's accuracy (``series``: the index in ``xs`` of each x it ran at, and a
    :class:`transfer.statistics.Spread` there) against ``xs``, the mean with its 95% interval
    over seeds (none for one seed): ``compare --summary``."""
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(xs)), 4.5))
    for strategy, spreads in series.items():
        ax.errorbar(list(spreads), [s.mean for s in spreads.values()], capsize=4, marker="o", label=strategy,
                    yerr=[[0 if s.low is None else s.mean - s.low for s in spreads.values()],
                          [0 if s.high is None else s.high - s.mean for s in spreads.values()]])
    ax.set_xticks(range(len(xs)), list(xs))
    ax.set(xlabel=xlabel, ylabel="accuracy (mean and 95% interval over seeds)", title=title)
    ax.legend(title="strategy")
    ax.grid(alpha=0.3)
    save_png(fig, path)
