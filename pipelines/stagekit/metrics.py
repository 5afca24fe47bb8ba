"""Test-set figures for classifiers and regressors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def classification_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]
) -> tuple[dict[str, float], np.ndarray]:
    """Accuracy, macro-F1 and per-class F1, plus the confusion matrix (rows: actual)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    y_pred = probabilities.argmax(axis=1)
    labels = np.arange(len(class_names))
    per_class = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    metrics = {
        "test_accuracy": float(accuracy_score(y_true, y_pred)),
        "test_macro_f1": float(
            f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)
        ),
        **{f"test_f1/{name}": float(f) for name, f in zip(class_names, per_class)},
    }
    return metrics, confusion_matrix(y_true, y_pred, labels=labels)


def regression_metrics(y_true: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    error = prediction.reshape(-1) - y_true.reshape(-1)
    variance = float(np.var(y_true))
    return {
        "test_rmse": float(np.sqrt(np.mean(error**2))),
        "test_mae": float(np.mean(np.abs(error))),
        "test_r2": float(1.0 - np.mean(error**2) / variance) if variance > 0 else 0.0,
    }
