"""Pseudo-label selection, the labeled/unlabeled split and weighted training, without Ray."""

import numpy as np
import pytest
import torch

from models.losses import TaskLoss
from pipelines.semisupervised.prepare import keep_labels
from pipelines.semisupervised.pseudo_labels import select_pseudo_labels, selection_stats
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.readers import read_unlabeled_csv, read_unlabeled_images
from pipelines.training.batches import ShardedBatches
from pipelines.training.tasks import ramp_weight
from pipelines.training.worker import interleave_shards
from tests.helpers import write_csv, write_image_folder


def probs(rows):
    return np.asarray(rows, dtype=np.float32)


def test_threshold_keeps_only_confident_predictions():
    p = probs([[0.95, 0.05], [0.6, 0.4], [0.1, 0.9], [0.02, 0.98]])
    selection = select_pseudo_labels(p, threshold=0.9)
    assert selection.indices.tolist() == [0, 2, 3]
    assert selection.labels.tolist() == [0, 1, 1]


def test_per_class_cap_keeps_the_most_confident_and_stops_a_class_flooding():
    # Class 0 is predicted (confidently) for 5 of 6 examples; the automatic cap is 6/2 = 3.
    p = probs([[0.99, 0.01], [0.97, 0.03], [0.95, 0.05], [0.93, 0.07], [0.91, 0.09], [0.0, 1.0]])
    selection = select_pseudo_labels(p, threshold=0.9)
    assert selection.indices.tolist() == [0, 1, 2, 5]
    explicit = select_pseudo_labels(p, threshold=0.9, max_per_class=1)
    assert explicit.indices.tolist() == [0, 5]


def test_stats_report_count_accuracy_and_balance():
    p = probs([[0.95, 0.05], [0.96, 0.04], [0.05, 0.95]])
    selection = select_pseudo_labels(p, threshold=0.9, max_per_class=5)
    stats = selection_stats(selection, ["a", "b"], truth=np.array([0, 1, 1]))
    assert stats["pseudo_labels"] == 3
    assert stats["pseudo_label_accuracy"] == pytest.approx(2 / 3)
    assert stats["class_balance"] == pytest.approx(0.5)
    assert stats["pseudo_count/a"] == 2
    nothing = select_pseudo_labels(p, threshold=0.999)
    assert len(nothing.indices) == 0
    assert "pseudo_label_accuracy" not in selection_stats(nothing, ["a", "b"], np.array([0, 1, 1]))


def test_labels_kept_per_class_by_fraction_or_count():
    labels = np.repeat([0, 1, 2], [100, 40, 20])
    kept = keep_labels(labels, ["x", "y", "z"], fraction=0.1, per_class=0, seed=0)
    assert np.bincount(labels[kept]).tolist() == [10, 4, 2]
    assert kept.tolist() == keep_labels(labels, ["x", "y", "z"], 0.1, 0, seed=0).tolist()
    assert np.bincount(labels[keep_labels(labels, ["x", "y", "z"], 0.1, 5, 1)]).tolist() == [
        5,
        5,
        5,
    ]


def test_a_class_left_without_labels_or_without_unlabeled_examples_is_named():
    labels = np.repeat([0, 1], [100, 4])
    with pytest.raises(UserError, match="class 'rare' keeps no labeled example"):
        keep_labels(labels, ["common", "rare"], fraction=0.05, per_class=0, seed=0)
    with pytest.raises(UserError, match="class 'rare' has 4 training examples"):
        keep_labels(labels, ["common", "rare"], fraction=0.05, per_class=4, seed=0)


def test_pseudo_labels_ramp_in_and_weights_scale_the_loss():
    assert [ramp_weight(e, weight=1.0, ramp_epochs=4) for e in range(5)] == [0.25, 0.5, 0.75, 1, 1]
    x, y = torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])
    pseudo = torch.tensor([False, False, True, True])
    batches = ShardedBatches(
        x, y, 4, shuffle=False, pseudo=pseudo, pseudo_weight=lambda e: ramp_weight(e, 1.0, 4)
    )
    _, _, w = next(iter(batches.epoch(0)))
    assert w.tolist() == [1.0, 1.0, 0.25, 0.25]
    loss = TaskLoss("cross_entropy", "classification")
    logits, target = torch.tensor([[2.0, 0.0], [0.0, 3.0]]), torch.tensor([1, 1])
    only_second = loss(logits, target, torch.tensor([0.0, 1.0]))
    assert only_second.item() == pytest.approx(loss.per_example(logits, target)[1].item() / 2)


def test_unlabeled_images_in_any_layout_and_unlabeled_csv(tmp_path):
    write_image_folder(
        tmp_path / "pool", {"batch1": [(10, 10)] * 3, "batch2/deeper": [(20, 5)] * 2}
    )
    pool = read_unlabeled_images(tmp_path / "pool", (6, 6), grayscale=True)
    assert pool.shape == (5, 1, 6, 6)
    csv = write_csv(tmp_path / "u.csv", ["b", "a", "note"], [[1, 2, "x"], [3, 4, "y"]])
    assert read_unlabeled_csv(csv, ("a", "b")).tolist() == [[2, 1], [4, 3]]
    with pytest.raises(UserError, match="feature column 'c' not found"):
        read_unlabeled_csv(csv, ("a", "c"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .png/.jpg images"):
        read_unlabeled_images(tmp_path / "empty", (6, 6), True)


def test_sharded_predictions_come_back_in_pool_order():
    pool = np.arange(7, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    parts = [pool[rank::3] for rank in range(3)]  # 3 workers, 7 examples: 3, 2, 2 rows
    assert np.array_equal(interleave_shards(parts, 7), pool)
    empty = [pool[0:1], np.zeros((0, 0), np.float32)]  # more workers than examples
    assert np.array_equal(interleave_shards(empty, 1), pool[0:1])
