"""What the `segment` stage hands on: its model file (feature transform, K-means centroids,
the autoencoder and the centroids of its codes, the served segmentation) and the customer
feature table they read, and how export rebuilds the three segmenters from them."""

from __future__ import annotations

import pandas as pd

from models.autoencoder import Autoencoder, AutoencoderConfig
from models.segmenter import Segmenter
from pipelines.unsupervised.features import FeatureTransform, customer_features
from pipelines.unsupervised.segmentation import served_segmenter
from pipelines.unsupervised.transactions import read_ingested

MODEL_FILE = "segment_model.pt"


def feature_table(raw_dir: str) -> pd.DataFrame:
    kind, table = read_ingested(raw_dir)
    return table if kind == "features" else customer_features(table)


def table_hash(table: pd.DataFrame) -> str:
    """The feature table's content hash: the `data_sha256` tag of the segment runs."""
    return str(pd.util.hash_pandas_object(table).sum().item())


def segmenters(bundle: dict) -> dict[str, Segmenter]:
    transform = FeatureTransform.from_dict(bundle["transform"])
    logs = [c in transform.log_columns for c in transform.columns]
    config = AutoencoderConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in bundle["autoencoder"].items()}
    )
    autoencoder = Autoencoder(config, len(transform.columns))
    autoencoder.load_state_dict(bundle["autoencoder_state"])
    return {
        "kmeans": Segmenter(logs, transform.mean, transform.std, bundle["kmeans_centroids"]),
        "autoencoder": Segmenter(
            logs, transform.mean, transform.std, bundle["code_centroids"], autoencoder.encoder
        ),
        "model": served_segmenter(
            logs, transform.mean, transform.std, bundle["model"], autoencoder
        ),
    }
