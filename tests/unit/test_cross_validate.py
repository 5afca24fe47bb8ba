"""The k-fold stage's pure parts: fold assignment, the too-small-class check, the spread."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.architecture import ArchitectureConfig
from pipelines.stagekit.config import TrainConfig
from pipelines.stagekit.dataset import PreparedData
from pipelines.stagekit.errors import UserError
from pipelines.supervised.config import EvaluateConfig, TrackingConfig
from pipelines.supervised.cross_validate import check_folds, cross_validate, fold_indices, spread


def test_every_example_is_tested_exactly_once_and_never_trained_on_in_its_fold():
    labels = np.repeat(np.arange(3), [40, 30, 20])
    folds = fold_indices(labels, 5, val_share=0.2, seed=0, stratified=True)
    assert len(folds) == 5
    tested = np.concatenate([fold.test for fold in folds])
    assert sorted(tested.tolist()) == list(range(len(labels)))
    for fold in folds:
        parts = [set(fold.train.tolist()), set(fold.val.tolist()), set(fold.test.tolist())]
        assert sum(len(p) for p in parts) == len(labels)
        assert set.union(*parts) == set(range(len(labels)))  # disjoint and complete
        # Stratified: each class keeps its share (90 examples: 8 / 6 / 4 per test fold).
        assert np.bincount(labels[fold.test], minlength=3).tolist() == [8, 6, 4]
        assert len(fold.val) == pytest.approx(0.2 * (len(labels) - len(fold.test)), abs=1)


def test_the_folds_follow_the_seed():
    labels = np.arange(50) % 2
    first = fold_indices(labels, 3, 0.2, seed=1, stratified=True)
    again = fold_indices(labels, 3, 0.2, seed=1, stratified=True)
    other = fold_indices(labels, 3, 0.2, seed=2, stratified=True)
    assert all(np.array_equal(a.test, b.test) for a, b in zip(first, again))
    assert not all(np.array_equal(a.test, b.test) for a, b in zip(first, other))


def test_regression_folds_are_plain_shuffles():
    values = np.linspace(0.0, 1.0, 30)
    folds = fold_indices(values, 3, 0.25, seed=0, stratified=False)
    assert [len(fold.test) for fold in folds] == [10, 10, 10]


def manifest_with(counts: dict[str, int]) -> PreparedData:
    splits = {
        split: {"size": sum(counts.values()), "class_counts": dict(counts)}
        for split in ("train", "val", "test")
    }
    return PreparedData(manifest={"splits": splits, "task": "classification"}, arrays={})


def test_a_class_too_small_for_the_folds_is_named_before_any_training():
    check_folds(manifest_with({"cat": 4, "dog": 4}), 5)  # 12 of each across the splits
    with pytest.raises(UserError, match=r"7 examples per class; 'bird' 3: lower evaluate.folds"):
        check_folds(manifest_with({"cat": 4, "bird": 1}), 5)


def test_the_spread_is_the_mean_and_deviation_over_folds_of_each_headline_figure():
    per_fold = [
        {"test_accuracy": 0.8, "test_accuracy_ci95_low": 0.7, "test_accuracy_examples": 10.0},
        {"test_accuracy": 0.9, "test_accuracy_ci95_low": 0.8, "test_accuracy_examples": 10.0},
        {"test_accuracy": 1.0, "test_accuracy_ci95_low": 0.9, "test_accuracy_examples": 10.0},
    ]
    assert spread(per_fold) == pytest.approx(
        {
            "test_accuracy_mean": 0.9,
            "test_accuracy_std": 0.1,
            "test_accuracy_min": 0.8,
            "test_accuracy_max": 1.0,
        }
    )


@pytest.mark.parametrize("folds", [1, -2])
def test_one_fold_or_fewer_is_refused(folds):
    with pytest.raises(ValueError, match="folds must be 0 .off. or at least 2"):
        EvaluateConfig(folds=folds)


def test_off_by_default_it_trains_nothing_and_says_so(tmp_path):
    metrics = tmp_path / "cross_validation.json"
    summary = cross_validate(
        EvaluateConfig(),
        ArchitectureConfig(),
        TrainConfig(),
        TrackingConfig(),
        data_dir=str(tmp_path / "no-data-needed"),
        metrics_path=str(metrics),
    )
    assert summary == {"folds": 0} == json.loads(metrics.read_text())
