"""Figures for DVC (CSV data that `dvc plots` renders) and MLflow (PNG images)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipelines.stagekit.atomic import write_bytes, write_text


def write_csv(path: str | Path, rows: Sequence[dict[str, object]], columns: Sequence[str]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    write_bytes(path, buffer.getvalue())


def learning_curves_png(history: Sequence[dict[str, float]], path: str | Path) -> None:
    """Train vs validation loss (and accuracy): the gap shows over- or under-fitting."""
    plt = _figure()
    epochs = [int(h["epoch"]) + 1 for h in history]
    has_accuracy = "val_accuracy" in history[0]
    fig, axes = plt.subplots(1, 2 if has_accuracy else 1, figsize=(10 if has_accuracy else 5, 3.6))
    axes = np.atleast_1d(axes)
    for split in ("train", "val"):
        axes[0].plot(epochs, [h[f"{split}_loss"] for h in history], label=split)
    axes[0].set(xlabel="epoch", ylabel="loss", title="loss")
    axes[0].legend()
    if has_accuracy:
        for split in ("train", "val"):
            axes[1].plot(epochs, [h[f"{split}_accuracy"] for h in history], label=split)
        axes[1].set(xlabel="epoch", ylabel="accuracy", title="accuracy")
        axes[1].legend()
    _save(fig, path)
    plt.close(fig)


def gradient_norms_png(history: Sequence[dict[str, float]], path: str | Path) -> None:
    """Per-layer gradient norm by epoch, log scale: vanishing gradients sit near the bottom."""
    plt = _figure()
    layers = [k for k in history[0] if k.startswith("grad_norm/")]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    epochs = [int(h["epoch"]) + 1 for h in history]
    for key in layers:
        ax.plot(
            epochs, [max(h.get(key, np.nan), 1e-12) for h in history], label=key.split("/", 1)[1]
        )
    ax.set(
        xlabel="epoch", ylabel="gradient L2 norm", yscale="log", title="per-layer gradient norms"
    )
    ax.legend(fontsize=6, ncol=2)
    _save(fig, path)
    plt.close(fig)


def confusion_matrix_png(matrix: np.ndarray, class_names: Sequence[str], path: str | Path) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    image = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=90)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted", ylabel="actual", title="confusion matrix (test)")
    for (i, j), count in np.ndenumerate(matrix):
        if count:
            ax.text(j, i, str(count), ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax)
    _save(fig, path)
    plt.close(fig)


def predicted_vs_actual_png(actual: np.ndarray, predicted: np.ndarray, path: str | Path) -> None:
    """Regression on the test split: points on the diagonal are exact predictions."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(actual, predicted, s=8, alpha=0.6)
    low, high = float(min(actual.min(), predicted.min())), float(max(actual.max(), predicted.max()))
    ax.plot([low, high], [low, high], color="grey", linewidth=1)
    ax.set(xlabel="actual", ylabel="predicted", title="predicted vs actual (test)")
    _save(fig, path)
    plt.close(fig)


def k_sweep_png(rows: Sequence[dict[str, float]], chosen_k: int, path: str | Path) -> None:
    """Inertia (the elbow) and silhouette against k, the chosen k marked."""
    plt = _figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    ks = [r["k"] for r in rows]
    left.plot(ks, [r["inertia"] for r in rows], marker="o")
    left.set(xlabel="k", ylabel="inertia", title="elbow")
    right.plot(ks, [r["silhouette"] for r in rows], marker="o", color="tab:green")
    right.set(xlabel="k", ylabel="silhouette", title="silhouette (higher is better)")
    for axis in (left, right):
        axis.axvline(chosen_k, color="grey", linestyle="--")
    _save(fig, path)
    plt.close(fig)


def projection_png(
    points: np.ndarray, labels: np.ndarray, names: Sequence[str], title: str, path: str | Path
) -> None:
    """A 2-D PCA projection of `points`, coloured by segment (legend: segment names)."""
    plt = _figure()
    centred = points - points.mean(axis=0)
    _, _, components = np.linalg.svd(centred[: min(len(centred), 20_000)], full_matrices=False)
    xy = centred @ components[:2].T
    fig, axis = plt.subplots(figsize=(6, 5))
    for segment, name in enumerate(names):
        mine = labels == segment
        axis.scatter(xy[mine, 0], xy[mine, 1], s=3, alpha=0.5, label=f"{segment}: {name}")
    axis.set(xlabel="PC 1", ylabel="PC 2", title=title)
    axis.legend(markerscale=4, fontsize=7, loc="best")
    _save(fig, path)
    plt.close(fig)


def lr_sweep_png(rows: Sequence[dict[str, object]], metric: str, path: str | Path) -> None:
    """A search's trials: final validation `metric` against learning rate, one colour per
    optimizer (log-scale x). Diverged trials sit on the bottom edge as crosses."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    optimizers = sorted({str(r["optimizer"]) for r in rows})
    colours = plt.get_cmap("tab10")
    finite = [float(r[metric]) for r in rows if np.isfinite(float(r[metric]))]
    floor = min(finite) if finite else 0.0
    for i, optimizer in enumerate(optimizers):
        mine = [r for r in rows if r["optimizer"] == optimizer]
        ok = [r for r in mine if r["status"] != "diverged" and np.isfinite(float(r[metric]))]
        bad = [r for r in mine if r not in ok]
        colour = colours(i % 10)
        ax.scatter([r["lr"] for r in ok], [r[metric] for r in ok], color=colour, label=optimizer)
        ax.scatter([r["lr"] for r in bad], [floor] * len(bad), color=colour, marker="x")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel=metric, title=f"{metric} by learning rate (x: diverged)")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
    plt.close(fig)


def best_curves_png(
    curves: dict[str, Sequence[dict[str, float]]], metric: str, path: str | Path
) -> None:
    """Validation `metric` per epoch of the best trial of each optimizer."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for optimizer, history in sorted(curves.items()):
        ax.plot(
            [int(h["epoch"]) + 1 for h in history], [h[metric] for h in history], label=optimizer
        )
    ax.set(xlabel="epoch", ylabel=metric, title=f"best trial per optimizer: {metric}")
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
    plt.close(fig)


def image_grid(images: np.ndarray, columns: int = 10, scale: int = 4) -> np.ndarray:
    """Images (N, C, H, W) in [0, 1] tiled `columns` to a row with a 1-pixel gap, each
    pixel drawn as a `scale` x `scale` block (8x8 digits are too small to see otherwise):
    (rows*H', columns*W') for one channel, (..., 3) for colour."""
    n, channels, height, width = images.shape
    rows = -(-n // columns)
    grid = np.ones((channels, rows * (height + 1) + 1, columns * (width + 1) + 1), np.float32)
    for i, image in enumerate(images):
        top, left = 1 + (i // columns) * (height + 1), 1 + (i % columns) * (width + 1)
        grid[:, top : top + height, left : left + width] = image
    grid = grid.repeat(scale, axis=1).repeat(scale, axis=2)
    return grid[0] if channels == 1 else grid.transpose(1, 2, 0)


def sample_grid_png(images: np.ndarray, path: str | Path, columns: int = 10) -> None:
    """`image_grid` of `images` as a PNG (grey for one channel)."""
    plt = _figure()
    buffer = io.BytesIO()
    grid = np.clip(image_grid(images, columns), 0.0, 1.0)
    plt.imsave(
        buffer, grid, cmap="gray" if grid.ndim == 2 else None, vmin=0.0, vmax=1.0, format="png"
    )
    write_bytes(path, buffer.getvalue())


def comparison_png(
    rows: Sequence[tuple[str, float, bool]],
    title: str,
    xlabel: str,
    path: str | Path,
    lower_is_better: bool = False,
) -> None:
    """One figure beside its baselines (the pipeline report): a horizontal bar per
    (label, value, is_dlpipe), dlpipe's models coloured and the baselines grey, each bar
    labelled with its value."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(rows) + 1.1))
    values = [value for _, value, _ in rows]
    colours = ["#1f77b4" if ours else "#b0b0b0" for _, _, ours in rows]
    bars = ax.barh([label for label, _, _ in rows], values, color=colours)
    ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], padding=3, fontsize=8)
    ax.invert_yaxis()  # the first row on top
    ax.set(xlabel=xlabel + (" (lower is better)" if lower_is_better else ""), title=title)
    ax.margins(x=0.15)
    _save(fig, path)
    plt.close(fig)
