"""Pictures of a run: training curves, a confusion matrix and a learning-rate range test, as PNG files.

matplotlib's object API (`Figure` + the Agg canvas) draws without pyplot: no display, no global
figure state, the same on a laptop, a headless server and inside a test.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# past this many classes, numbers in the cells would be unreadable; colours still tell the story
MAX_ANNOTATED_CLASSES = 25


def _save(figure: Figure, path: Path) -> Path:
    """Write the figure next to `path` and rename it into place: a killed run leaves no half PNG."""
    FigureCanvasAgg(figure)
    temporary = path.with_name(path.name + ".tmp")
    figure.savefig(temporary, format="png", dpi=110, bbox_inches="tight")
    os.replace(temporary, path)
    return path


def plot_training_curves(history: list[dict[str, Any]], path: Path, best_epoch: int | None = None) -> Path:
    """Training loss (left) and validation metrics (right) per epoch; the best epoch marked."""
    epochs = [record["epoch"] for record in history]
    figure = Figure(figsize=(9, 3.4))
    loss_axes, metric_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, [r["train_loss"] for r in history], marker="o", color="tab:red")
    loss_axes.set(title="Training loss", xlabel="epoch", ylabel="cross-entropy")
    for key, label in (("accuracy", "accuracy"), ("f1_macro", "macro F1")):
        if all(key in r for r in history):
            metric_axes.plot(epochs, [r[key] for r in history], marker="o", label=label)
    metric_axes.set(title="Validation", xlabel="epoch", ylim=(0, 1.02))
    if best_epoch is not None and best_epoch in epochs:
        for axes in (loss_axes, metric_axes):
            axes.axvline(best_epoch, color="grey", linestyle=":", label="best epoch" if axes is metric_axes else None)
    metric_axes.legend(loc="lower right")
    for axes in (loss_axes, metric_axes):
        axes.grid(alpha=0.3)
        axes.set_xticks(epochs if len(epochs) <= 20 else axes.get_xticks())
    return _save(figure, path)


def plot_confusion_matrix(
    matrix: list[list[int]], labels: list[str], path: Path, title: str = "Confusion matrix"
) -> Path:
    """Counts of true (rows) against predicted (columns) classes, shaded by each row's share.

    Not scikit-learn's `ConfusionMatrixDisplay`: it colours by the numbers it prints, so it shows either
    counts or shares; here the counts are written and the shading is the recall, so small classes show.
    """
    count = len(labels)
    size = min(3.0 + 0.45 * count, 16.0)
    figure = Figure(figsize=(size + 1.2, size))
    axes = figure.subplots()
    # shade by recall (the row's share) so small classes are as visible as large ones
    shares = [[cell / max(sum(row), 1) for cell in row] for row in matrix]
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    axes.set_xticks(range(count), labels, rotation=45 if count > 4 else 0, ha="right" if count > 4 else "center")
    axes.set_yticks(range(count), labels)
    axes.set(xlabel="predicted", ylabel="true", title=title)
    if count <= MAX_ANNOTATED_CLASSES:
        for row in range(count):
            for column in range(count):
                dark = shares[row][column] > 0.5
                axes.text(column, row, str(matrix[row][column]), ha="center", va="center",
                          color="white" if dark else "black", fontsize=9 if count <= 10 else 7)
    return _save(figure, path)


def plot_lr_range_test(record: dict[str, Any], path: Path) -> Path:
    """The range test of training.lr auto (training/lr_finder.py): loss against learning rate, log scale,
    the raw losses faint, the smoothed curve the rule reads, and the learning rate it chose."""
    figure = Figure(figsize=(6.4, 3.8))
    axes = figure.subplots()
    axes.plot(record["lrs"], record["raw_losses"], color="tab:blue", alpha=0.25, linewidth=1, label="loss per step")
    axes.plot(record["lrs"], record["losses"], color="tab:blue", linewidth=2, label="smoothed")
    axes.axvline(record["lr"], color="tab:red", linestyle="--", label=f"lr {record['lr']:.3g}")
    axes.set_xscale("log")
    # framed on the smoothed curve's fall, with as much of its rise again: the diverging end (4x the
    # best) and single wild steps would otherwise squash the part the rule reads flat
    losses = record["losses"]
    low = min(losses)
    start = max(losses[: losses.index(low) + 1])
    fall = start - low or 0.05 * abs(start) or 0.05
    axes.set_ylim(low - 0.1 * fall, start + fall)
    axes.set(title="Learning-rate range test", xlabel="learning rate (log scale)", ylabel="training loss")
    axes.grid(alpha=0.3, which="both")
    axes.legend(loc="upper left")
    return _save(figure, path)
