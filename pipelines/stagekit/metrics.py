"""Test-set figures for classifiers and regressors, each with how far to trust it.

A figure from a few examples means little: 4 right out of 5 is "0.8", and the true
accuracy could be anywhere from 0.38 to 0.96. So every accuracy carries the number of
examples it counts and a 95% Wilson interval (which, unlike the normal approximation,
stays inside [0, 1] and is honest at 0/n and n/n), and every F1 a 95% bootstrap interval;
splits too small to judge by get a warning naming the setting that enlarges them.

The intervals assume independent examples: for masked tokens (several per document) and
for a clustering's Hungarian-matched accuracy (the matching is fitted on the same data)
they are narrower than the truth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Z_95 = 1.959964  # the normal quantile of a two-sided 95% interval
BOOTSTRAP_RESAMPLES = 1000
SMALL_SPLIT = 30
"""A validation or test split with fewer examples gets a warning."""
SMALL_CLASS = 5
"""So does a class with fewer examples in such a split."""
SPLIT_SETTINGS = {"val": "prepare.val_fraction", "test": "prepare.test_fraction"}
SEQUENCE_SPLIT_SETTINGS = {"val": "timeseries.val_fraction", "test": "timeseries.test_fraction"}
"""What sizes the splits of prepared time series (prepare_timeseries; a .ts set's test
split is the archive's own)."""


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion `successes` / `n` ((0, 1) when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = Z_95 * Z_95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_95 * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def accuracy_figures(name: str, correct: int, n: int) -> dict[str, float]:
    """`name` (correct / n) with its example count and 95% Wilson interval, as the
    metrics files spell them: name, name_examples, name_ci95_low, name_ci95_high."""
    low, high = wilson_interval(correct, n)
    return {
        name: correct / n if n else 0.0,
        f"{name}_examples": float(n),
        f"{name}_ci95_low": low,
        f"{name}_ci95_high": high,
    }


def _f1(true_positive: np.ndarray, predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Per-class F1 = 2 TP / (predicted + actual) from counts of the same shape; 0 where a
    class is neither predicted nor present."""
    denominator = predicted + actual
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, 2 * true_positive / denominator, 0.0)


def f1_intervals(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile-bootstrap intervals of the macro F1 and each class's F1: (2,) low/high
    of the macro, (2, K) of the classes. Resampled test sets are drawn with a fixed seed,
    so the same predictions always give the same interval. Memory stays bounded (a chunk
    of resamples at a time, counts per class rather than whole confusion matrices)."""
    n, k = len(y_true), num_classes
    rng = np.random.default_rng(seed)
    chunk = max(1, min(BOOTSTRAP_RESAMPLES, 2_000_000 // max(n, 1)))
    per_class = []
    for start in range(0, BOOTSTRAP_RESAMPLES, chunk):
        r = min(chunk, BOOTSTRAP_RESAMPLES - start)
        draws = rng.integers(0, n, size=(r, n))
        truth, predicted = y_true[draws], y_pred[draws]
        # Resample i counts class c in bin i*k + c: one bincount per kind of count.
        offsets = np.arange(r)[:, None] * k
        hits = (truth + offsets)[truth == predicted]
        true_positive, predicted_count, actual = (
            np.bincount(bins.ravel(), minlength=r * k).reshape(r, k)
            for bins in (hits, predicted + offsets, truth + offsets)
        )
        per_class.append(_f1(true_positive, predicted_count, actual))
    scores = np.concatenate(per_class)  # (R, K)
    return np.percentile(scores.mean(axis=1), [2.5, 97.5]), np.percentile(
        scores, [2.5, 97.5], axis=0
    )


def classification_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]
) -> tuple[dict[str, float], np.ndarray]:
    """Accuracy, macro-F1 and per-class F1 with their 95% intervals and example counts,
    plus the confusion matrix (rows: actual)."""
    from sklearn.metrics import confusion_matrix

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = probabilities.argmax(axis=1)
    num_classes = len(class_names)
    matrix = confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))
    per_class = _f1(np.diagonal(matrix), matrix.sum(axis=0), matrix.sum(axis=1))
    macro_interval, class_intervals = f1_intervals(y_true, y_pred, num_classes)
    metrics = {
        **accuracy_figures("test_accuracy", int(np.trace(matrix)), len(y_true)),
        "test_macro_f1": float(per_class.mean()),
        "test_macro_f1_ci95_low": float(macro_interval[0]),
        "test_macro_f1_ci95_high": float(macro_interval[1]),
    }
    for k, name in enumerate(class_names):
        metrics[f"test_f1/{name}"] = float(per_class[k])
        metrics[f"test_f1/{name}_examples"] = float(matrix[k].sum())
        metrics[f"test_f1/{name}_ci95_low"] = float(class_intervals[0, k])
        metrics[f"test_f1/{name}_ci95_high"] = float(class_intervals[1, k])
    return metrics, matrix


def headline(metrics: Mapping[str, float]) -> str:
    """The overall figures for a log line, intervals beside them: `test_accuracy 0.9889
    (95% CI 0.9679-0.9962, 270 examples), test_macro_f1 ...`."""
    shown = []
    for name, value in metrics.items():
        if "/" in name or name.endswith(("_ci95_low", "_ci95_high", "_examples")):
            continue
        text = f"{name} {value:.4f}"
        if f"{name}_ci95_low" in metrics:
            text += f" (95% CI {metrics[f'{name}_ci95_low']:.4f}-{metrics[f'{name}_ci95_high']:.4f}"
            examples = metrics.get(f"{name}_examples")
            text += f", {examples:.0f} examples)" if examples is not None else ")"
        shown.append(text)
    return ", ".join(shown)


def small_split_warnings(splits: Mapping[str, Mapping], input_kind: str = "image") -> list[str]:
    """One line per validation or test split (a prepared manifest's `splits`, of inputs of
    `input_kind`) too small to judge a model by, naming the setting that enlarges it."""
    warnings = []
    sequences = input_kind == "sequence"
    for split, setting in (SEQUENCE_SPLIT_SETTINGS if sequences else SPLIT_SETTINGS).items():
        summary = splits.get(split)
        if not summary:
            continue
        size = summary["size"]
        fix = (
            f"raise {setting} or label more data"
            if sequences  # k-fold (cross_validate) runs on the image/table data only
            else f"raise {setting}, label more data, or set evaluate.folds for k-fold figures "
            "(stage cross_validate)"
        )
        if size < SMALL_SPLIT:
            low, high = wilson_interval(size, size) if size else (0.0, 1.0)
            warnings.append(
                f"the {split} split has {size} examples (fewer than {SMALL_SPLIT}): figures "
                f"on it are rough (even a perfect accuracy there means 95% confidence only "
                f"that the true one is above {low:.2f}); {fix}"
            )
        small = {
            name: count
            for name, count in (summary.get("class_counts") or {}).items()
            if count < SMALL_CLASS
        }
        if small:
            listed = ", ".join(f"{name!r} {count}" for name, count in small.items())
            warnings.append(
                f"the {split} split has classes with fewer than {SMALL_CLASS} examples "
                f"({listed}): their F1 is close to noise; {fix}"
            )
    return warnings


def regression_metrics(y_true: np.ndarray, prediction: np.ndarray) -> dict[str, float]:
    error = prediction.reshape(-1) - y_true.reshape(-1)
    variance = float(np.var(y_true))
    return {
        "test_rmse": float(np.sqrt(np.mean(error**2))),
        "test_mae": float(np.mean(np.abs(error))),
        "test_r2": float(1.0 - np.mean(error**2) / variance) if variance > 0 else 0.0,
    }
