"""Choosing pseudo-labels from a teacher's predictions on the unlabeled pool (pure numpy)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Selection:
    indices: np.ndarray
    """Positions in the unlabeled pool that received a pseudo-label."""
    labels: np.ndarray
    """The pseudo-label (teacher's top class) of each selected example."""
    confidence: np.ndarray
    """The teacher's probability for that class."""


def select_pseudo_labels(
    probabilities: np.ndarray, threshold: float, max_per_class: int = 0
) -> Selection:
    """Keep predictions whose top probability reaches `threshold`, at most `max_per_class`
    per class (most confident first). `max_per_class` 0 means pool size / classes: a class
    the teacher over-predicts cannot take more than a balanced share."""
    num_examples, num_classes = probabilities.shape
    cap = max_per_class or math.ceil(num_examples / num_classes)
    labels = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    chosen: list[np.ndarray] = []
    for cls in range(num_classes):
        candidates = np.flatnonzero((labels == cls) & (confidence >= threshold))
        best_first = candidates[np.argsort(-confidence[candidates], kind="stable")]
        chosen.append(best_first[:cap])
    indices = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
    return Selection(indices, labels[indices], confidence[indices])


def selection_stats(
    selection: Selection, class_names: Sequence[str], truth: np.ndarray | None
) -> dict[str, float]:
    """Count, per-class balance and, where the true labels are known, accuracy of a selection."""
    counts = np.bincount(selection.labels, minlength=len(class_names))
    stats: dict[str, float] = {
        "pseudo_labels": float(len(selection.indices)),
        "mean_confidence": float(selection.confidence.mean()) if len(selection.indices) else 0.0,
        # 1.0 when every class got the same number; lower as one class dominates.
        "class_balance": float(counts.min() / counts.max()) if counts.max() else 0.0,
        **{f"pseudo_count/{name}": float(c) for name, c in zip(class_names, counts)},
    }
    if truth is not None and len(selection.indices):
        stats["pseudo_label_accuracy"] = float(
            np.mean(truth[selection.indices] == selection.labels)
        )
    return stats
