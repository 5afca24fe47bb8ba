"""Customer features, transaction-log checks, K-means arithmetic and segment figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from models.autoencoder import Autoencoder, AutoencoderConfig
from models.dec import soft_assignment, target_distribution
from models.kmeans import partial_sums
from pipelines.stagekit.errors import UserError
from pipelines.unsupervised.config import SegmentConfig
from pipelines.unsupervised.features import FeatureTransform, customer_features
from pipelines.unsupervised.figures import label_agreement, mean_pairwise_ari, profiles
from pipelines.unsupervised.kmeans import KMeansShard
from pipelines.unsupervised.transactions import cdnow_path, read_cdnow, read_transaction_csv
from tests.helpers import write_csv


def test_cdnow_reads_as_the_documented_log():
    log = read_cdnow(cdnow_path())
    assert len(log) == 69_659 and log["customer_id"].nunique() == 23_570
    assert log["timestamp"].min() == pd.Timestamp("1997-01-01")
    assert (log["amount"] >= 0).all()


def test_features_per_customer():
    log = pd.DataFrame(
        {
            "customer_id": ["a", "a", "a", "b"],
            "timestamp": pd.to_datetime(["2024-01-01", "2024-01-11", "2024-01-21", "2024-01-15"]),
            "amount": [10.0, 20.0, 30.0, 5.0],
            "quantity": [np.nan] * 4,
        }
    )
    features = customer_features(log)
    a, b = features.loc["a"], features.loc["b"]
    assert (a["frequency"], a["monetary_total"], a["monetary_mean"]) == (3, 60, 20)
    assert (a["recency_days"], a["tenure_days"], a["interpurchase_days"]) == (1, 21, 10)
    assert (b["recency_days"], b["interpurchase_days"]) == (7, 7)  # one purchase: its tenure
    assert "items_per_purchase" not in features.columns


def test_transform_logs_skewed_columns_and_standardizes():
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"skewed": rng.lognormal(0, 1.5, 500), "even": rng.normal(5, 1, 500)})
    transform = FeatureTransform.fit(table)
    assert transform.log_columns == ("skewed",)
    x = transform.apply(table)
    assert np.allclose(x.mean(0), 0, atol=1e-5) and np.allclose(x.std(0), 1, atol=1e-4)
    again = FeatureTransform.from_dict(transform.to_dict()).apply(table)
    assert np.array_equal(x, again)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([["c1", "2024-13-01", "5"]], "row 2, column 'timestamp': not a date"),
        (
            [["c1", "2024-01-01", "5"], ["c2", "2024-01-02", "-3"]],
            "row 3, column 'amount': negative",
        ),
        ([["", "2024-01-01", "5"]], "row 2, column 'customer_id': empty customer id"),
        ([["c1", "2024-01-01", "ten"]], "row 2, column 'amount': not a number"),
    ],
)
def test_malformed_logs_name_row_and_column(tmp_path, rows, message):
    path = write_csv(tmp_path / "log.csv", ["customer_id", "timestamp", "amount"], rows)
    with pytest.raises(UserError, match=message):
        read_transaction_csv(path)


def test_missing_id_column_is_named(tmp_path):
    path = write_csv(
        tmp_path / "log.csv", ["client", "timestamp", "amount"], [["c", "20240101", "1"]]
    )
    with pytest.raises(UserError, match="no column 'customer_id'"):
        read_transaction_csv(path)
    log = read_transaction_csv(path, customer_column="client")
    assert log["timestamp"][0] == pd.Timestamp("2024-01-01")


def test_shard_sums_add_up_to_the_whole():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4)).astype(np.float32)
    centroids = x[:3].copy()
    whole = partial_sums(torch.from_numpy(x), torch.from_numpy(centroids))
    parts = [KMeansShard(piece).step(centroids) for piece in np.array_split(x, 3)]
    assert np.allclose(sum(p[0] for p in parts), whole[0].numpy(), atol=1e-4)
    assert np.array_equal(sum(p[1] for p in parts), whole[1].numpy())
    assert sum(p[2] for p in parts) == pytest.approx(float(whole[2]), rel=1e-5)


def test_label_agreement_is_invariant_to_cluster_numbering():
    truth = np.array([0, 0, 1, 1, 2, 2])
    scores = label_agreement(np.array([2, 2, 0, 0, 1, 1]), truth)
    assert scores == {"accuracy": 1.0, "nmi": pytest.approx(1.0), "ari": pytest.approx(1.0)}
    assert label_agreement(np.array([0, 0, 0, 1, 1, 1]), truth)["accuracy"] == pytest.approx(4 / 6)
    assert mean_pairwise_ari([truth, truth, np.array([1, 1, 0, 0, 2, 2])]) == pytest.approx(1.0)


def test_profiles_name_what_stands_out():
    raw = pd.DataFrame(
        {
            "recency_days": [5, 8, 400, 420],
            "frequency": [12, 10, 1, 1],
            "monetary_total": [900, 700, 20, 15],
        }
    )
    named = {p["segment"]: p for p in profiles(raw, np.array([0, 0, 1, 1]))}
    assert set(named[0]["name"].split()) == {"recent", "frequent", "high-value"}
    assert set(named[1]["name"].split()) == {"lapsed", "one-off", "low-value"}
    assert named[0]["size"] == 2 and named[0]["means"]["frequency"] == 11


def test_autoencoder_and_dec_shapes():
    model = Autoencoder(AutoencoderConfig(hidden_sizes=(8,), bottleneck=2), 5)
    x = torch.randn(7, 5)
    assert model(x).shape == (7, 5) and model.encode(x).shape == (7, 2)
    q = soft_assignment(model.encode(x), torch.randn(3, 2))
    p = target_distribution(q)
    assert torch.allclose(q.sum(1), torch.ones(7)) and torch.allclose(p.sum(1), torch.ones(7))


def test_conv_autoencoder_takes_and_gives_flattened_images():
    config = AutoencoderConfig(hidden_sizes=(4, 8, 16), bottleneck=3, kind="conv")
    model = Autoencoder(config, 64, (1, 8, 8))
    x = torch.rand(5, 64)
    assert model(x).shape == (5, 64) and model.encode(x).shape == (5, 3)
    # the exported segment graph runs the encoder alone on flattened rows
    assert model.encoder(x).shape == (5, 3)


@pytest.mark.parametrize(
    ("image_shape", "message"),
    [(None, "needs images"), ((1, 4, 4), "needs images"), ((1, 6, 6), "must divide by 4")],
)
def test_conv_autoencoder_refuses_what_is_not_a_fitting_image(image_shape, message):
    config = AutoencoderConfig(hidden_sizes=(4, 8, 16), bottleneck=3, kind="conv")
    features = 36 if image_shape == (1, 6, 6) else 64
    with pytest.raises(ValueError, match=message):
        Autoencoder(config, features, image_shape)


def test_customer_segmentation_refuses_the_conv_kind():
    with pytest.raises(ValueError, match="segment.autoencoder.kind must be dense"):
        SegmentConfig(autoencoder=AutoencoderConfig(kind="conv"))


def test_dbscan_at_the_k_distance_knee_finds_dense_blobs_and_calls_the_scatter_noise():
    from pipelines.unsupervised.density import dbscan_labels, knee_eps, pca_codes

    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(c, 0.3, size=(200, 2)) for c in ((0, 0), (6, 6))])
    scatter = rng.uniform(-4, 10, size=(30, 2))
    points = np.concatenate([blobs, scatter])
    eps = knee_eps(points, min_samples=10)
    labels = dbscan_labels(points, eps, min_samples=10)
    assert labels.max() + 1 == 2  # the two blobs
    assert len(set(labels[:200])) == 1 and len(set(labels[200:400])) == 1
    assert np.mean(labels[400:] == -1) > 0.7  # most of the scatter is noise
    codes, explained = pca_codes(np.column_stack([points, 2 * points[:, :1]]), 2, seed=0)
    assert codes.shape == (430, 2) and explained > 0.999  # the third column adds nothing


def test_the_dbscan_segmenter_gives_new_points_the_nearest_core_points_segment_or_noise(
    tmp_path,
):
    from sklearn.cluster import DBSCAN

    from models.segmenter import NOISE, Segmenter
    from pipelines.stagekit.onnx_export import export_onnx, onnx_session

    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(c, 0.3, (150, 2)) for c in ((0, 0), (5, 5), (0, 5))]).astype(
        np.float32
    )
    outliers = np.array([[10.0, -10.0], [-8.0, 12.0]], np.float32)
    x = np.concatenate([blobs, outliers])
    fitted = DBSCAN(eps=0.5, min_samples=5).fit(x)
    core = fitted.core_sample_indices_
    # Identity transform: no log columns, mean 0, std 1.
    segmenter = Segmenter(
        [False, False],
        [0.0, 0.0],
        [1.0, 1.0],
        torch.from_numpy(x[core]),
        point_segments=torch.from_numpy(fitted.labels_[core]),
        radius=0.5,
    ).eval()
    with torch.no_grad():
        ids, distances = (t.numpy() for t in segmenter(torch.from_numpy(x)))
    assert distances.shape == (len(x), 3)
    assert (ids[-2:] == NOISE).all()  # far from every core point
    # DBSCAN's own labels, from the rule alone: every core and noise point, and the border
    # points (a border point near two clusters may go either way; here there are none).
    assert np.mean(ids == fitted.labels_) == 1.0
    path = tmp_path / "dbscan.onnx"
    export_onnx(segmenter, torch.from_numpy(x[:2]), path, 18, output_name=("segment", "distances"))
    onnx_ids, onnx_distances = onnx_session(path).run(None, {"input": x})
    assert np.array_equal(onnx_ids, ids) and np.abs(onnx_distances - distances).max() < 1e-5


def test_noise_is_its_own_profile_named_noise():
    table = pd.DataFrame({"frequency": [1.0, 2.0, 30.0, 1.0]})
    named = {p["segment"]: p["name"] for p in profiles(table, np.array([0, 0, -1, 0]))}
    assert named[-1] == "noise" and named[0] != "noise"


def test_the_pca_space_in_the_graph_is_scikit_learns_transform():
    from pipelines.unsupervised.config import SegmentConfig
    from pipelines.unsupervised.segmentation import encoder_module, reduced_space

    x = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32)
    x[:, 1] = 2 * x[:, 0] + 0.1 * x[:, 1]  # a correlated pair: PCA has something to find
    config = SegmentConfig(reduce="pca", pca_components=3)
    space = reduced_space(config, x, autoencoder_codes=None, run=None, stage="t")
    assert space.codes.shape == (300, 3) and 0.5 < space.figures["pca_explained_variance"] < 1
    with torch.no_grad():
        graph_codes = encoder_module(space.encoder, autoencoder=None)(torch.from_numpy(x))
    assert np.allclose(graph_codes.numpy(), space.codes, atol=1e-5)
