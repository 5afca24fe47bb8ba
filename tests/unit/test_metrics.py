"""Test-set figures carry their example counts and 95% intervals; small splits are named."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from pipelines.stagekit.metrics import (
    accuracy_figures,
    classification_metrics,
    f1_intervals,
    headline,
    small_split_warnings,
    wilson_interval,
)


@pytest.mark.parametrize(
    "correct, n, low, high",
    # Reference values of the Wilson score interval (z = 1.96).
    [
        (4, 5, 0.3755, 0.9638),
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (81, 100, 0.7222, 0.8749),
    ],
)
def test_the_wilson_interval_matches_reference_values(correct, n, low, high):
    assert wilson_interval(correct, n) == pytest.approx((low, high), abs=1e-4)


def test_an_interval_narrows_as_the_split_grows():
    small, large = accuracy_figures("acc", 4, 5), accuracy_figures("acc", 800, 1000)
    assert small["acc"] == large["acc"] == 0.8
    assert small["acc_examples"] == 5
    width = lambda f: f["acc_ci95_high"] - f["acc_ci95_low"]  # noqa: E731
    assert width(small) > 0.5 > 0.1 > width(large)


def predictions(n=300, right=0.8, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    predicted = np.where(rng.random(n) < right, y, (y + 1) % 3)
    return y, np.eye(3)[predicted]


def test_classification_figures_hold_counts_and_intervals_around_the_point_estimates():
    y, probabilities = predictions()
    metrics, matrix = classification_metrics(y, probabilities, ["a", "b", "c"])
    macro = f1_score(y, probabilities.argmax(1), average="macro")
    assert metrics["test_macro_f1"] == pytest.approx(macro)
    assert metrics["test_accuracy_examples"] == 300 and matrix.sum() == 300
    for name in ("test_accuracy", "test_macro_f1", "test_f1/b"):
        assert metrics[f"{name}_ci95_low"] < metrics[name] < metrics[f"{name}_ci95_high"]
    assert sum(metrics[f"test_f1/{c}_examples"] for c in "abc") == 300
    again, _ = classification_metrics(y, probabilities, ["a", "b", "c"])
    assert again == metrics  # the bootstrap is seeded
    assert f"test_accuracy {metrics['test_accuracy']:.4f} (95% CI" in headline(metrics)
    assert "300 examples" in headline(metrics)


def test_a_five_example_test_split_is_called_out_with_the_setting_to_change():
    splits = {
        "train": {"size": 160, "class_counts": {"cat": 60, "dog": 100}},
        "val": {"size": 40, "class_counts": {"cat": 36, "dog": 4}},
        "test": {"size": 5, "class_counts": {"cat": 3, "dog": 2}},
    }
    warnings = small_split_warnings(splits)
    assert any("test split has 5 examples" in w and "prepare.test_fraction" in w for w in warnings)
    assert all("evaluate.folds" in w for w in warnings)  # k-fold figures, the other way out
    assert any(
        "val split" in w and "'dog' 4" in w and "prepare.val_fraction" in w for w in warnings
    )
    assert not any("train" in w for w in warnings)  # the figures come from val and test
    assert small_split_warnings({"val": {"size": 300}, "test": {"size": 300}}) == []


def test_the_bootstrap_interval_is_sklearns_f1_over_the_same_resamples():
    y, probabilities = predictions(n=120, right=0.7, seed=3)
    predicted = probabilities.argmax(1)
    macro, per_class = f1_intervals(y, predicted, 3, seed=0)
    draws = np.random.default_rng(0).integers(0, 120, size=(1000, 120))  # the same draws
    reference = [
        f1_score(y[d], predicted[d], average=None, labels=[0, 1, 2], zero_division=0) for d in draws
    ]
    assert macro == pytest.approx(np.percentile(np.mean(reference, axis=1), [2.5, 97.5]))
    assert per_class == pytest.approx(np.percentile(reference, [2.5, 97.5], axis=0))
