"""The segmentation `segment.method` and `segment.reduce` ask for: the one served.

A space to cluster in (the standardized features, principal components, the autoencoder's
codes, a VAE's codes) and a method that clusters there (K-means at the sweep's k, or
DBSCAN with its noise). What it hands on is what the exported graph needs (see
models/segmenter.py): the encoder into the space, the segments' points (K-means'
centroids, or a sample of DBSCAN's core points with each one's segment) and, for DBSCAN,
the radius beyond which a customer is noise.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from models.autoencoder import Autoencoder
from models.segmenter import Segmenter
from models.vae import VAE, PosteriorMean, VaeConfig
from pipelines.stagekit.config import config_to_dict
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.tracking import RunLogger
from pipelines.unsupervised.autoencoder import train_vae, vae_codes
from pipelines.unsupervised.config import SegmentConfig
from pipelines.unsupervised.density import dbscan, knee_eps, pca
from pipelines.unsupervised.kmeans import kmeans_shards

log = logging.getLogger(__name__)


@dataclass
class Space:
    """Points in a space to cluster, and how the graph gets there from standardized rows."""

    codes: np.ndarray
    encoder: dict[str, Any] | None
    """The bundle's description of the encoder (None: the standardized features)."""
    figures: dict[str, float] = field(default_factory=dict)


@dataclass
class Clustering:
    labels: np.ndarray
    """Each customer's segment, -1 for DBSCAN's noise."""
    points: np.ndarray
    """The segments' points in the space: centroids, or core points."""
    point_segments: np.ndarray | None
    """Each point's segment (None: one centroid per segment, in order)."""
    radius: float
    figures: dict[str, float]


def reduced_space(
    config: SegmentConfig,
    x: np.ndarray,
    autoencoder_codes: np.ndarray,
    run: RunLogger | None,
    stage: str,
) -> Space:
    """The standardized rows `x` in the space `config.reduce` names."""
    if config.reduce == "none":
        return Space(x, None)
    if config.reduce == "autoencoder":  # the stage's own autoencoder (refined, if it was)
        return Space(autoencoder_codes, {"kind": "autoencoder"})
    if config.reduce == "pca":
        fitted = pca(x, config.pca_components, config.seed)
        explained = float(fitted.explained_variance_ratio_.sum())
        log.info(
            "PCA: %d components explain %.1f%% of the variance",
            fitted.n_components_,
            100 * explained,
        )
        return Space(
            fitted.transform(x).astype(np.float32),
            {
                "kind": "pca",
                "components": torch.from_numpy(fitted.components_.astype(np.float32)),
                "center": torch.from_numpy(fitted.mean_.astype(np.float32)),
            },
            {"pca_explained_variance": explained},
        )
    vae = train_vae(
        x, config.vae, config.train, config.seed, run, f"{stage}_vae", lr_key="segment.train.lr"
    )
    entry = {
        "kind": "vae",
        "config": config_to_dict(config.vae),
        "features": x.shape[1],
        "state": vae.state_dict(),
    }
    return Space(vae_codes(vae, x), entry)


def cluster(config: SegmentConfig, space: Space, k: int) -> Clustering:
    """`config.method` on the space's points (K-means at `k`; DBSCAN finds its own count)."""
    codes = space.codes
    if config.method == "kmeans":
        with kmeans_shards(codes, config.num_shards) as points:
            fit = points.fit(k, config.seed, config.restarts, config.max_iterations)
        return Clustering(fit.labels, fit.centroids, None, math.inf, {})
    eps = config.dbscan_eps or knee_eps(codes, config.dbscan_min_samples)
    labels, core = dbscan(codes, eps, config.dbscan_min_samples)
    core = core[labels[core] >= 0]
    found = int(labels.max()) + 1
    if found == 0:
        raise UserError(
            f"DBSCAN found no cluster at eps {eps:.4g} with min_samples "
            f"{config.dbscan_min_samples}: every customer is noise; raise segment.dbscan_eps "
            "or lower segment.dbscan_min_samples"
        )
    if len(core) > config.dbscan_max_core_points:
        rng = np.random.default_rng(config.seed)
        core = np.sort(rng.choice(core, config.dbscan_max_core_points, replace=False))
    log.info(
        "DBSCAN at eps %.4g (%s), min_samples %d: %d segments, %.1f%% noise, %d core points kept",
        eps,
        "from params" if config.dbscan_eps else "k-distance knee",
        config.dbscan_min_samples,
        found,
        100 * float(np.mean(labels == -1)),
        len(core),
    )
    figures = {"eps": float(eps), "noise_share": float(np.mean(labels == -1))}
    return Clustering(labels, codes[core], labels[core], float(eps), figures)


def encoder_module(
    entry: dict[str, Any] | None, autoencoder: Autoencoder
) -> torch.nn.Module | None:
    """The graph's encoder from the bundle's description of it."""
    if entry is None:
        return None
    if entry["kind"] == "autoencoder":
        return autoencoder.encoder
    if entry["kind"] == "pca":  # x -> (x - center) @ components.T
        components = entry["components"]
        linear = torch.nn.Linear(components.shape[1], components.shape[0])
        with torch.no_grad():
            linear.weight.copy_(components)
            linear.bias.copy_(-components @ entry["center"])
        return linear
    config = VaeConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in entry["config"].items()}
    )
    vae = VAE(config, (entry["features"],))
    vae.load_state_dict(entry["state"])
    return PosteriorMean(vae.eval())


def model_entry(config: SegmentConfig, space: Space, clustering: Clustering) -> dict[str, Any]:
    """The bundle's `model`: what `served_segmenter` rebuilds the graph's module from."""
    segments = clustering.point_segments
    return {
        "method": config.method,
        "reduce": config.reduce,
        "points": torch.from_numpy(np.asarray(clustering.points, dtype=np.float32)),
        "point_segments": None if segments is None else torch.from_numpy(segments.astype(np.int64)),
        "radius": clustering.radius,
        "encoder": space.encoder,
    }


def served_segmenter(
    log_columns: list[bool],
    mean: list[float],
    std: list[float],
    model: dict[str, Any],
    autoencoder: Autoencoder,
) -> Segmenter:
    """The served Segmenter from the bundle's `model` entry."""
    return Segmenter(
        log_columns,
        mean,
        std,
        model["points"],
        encoder_module(model["encoder"], autoencoder),
        model["point_segments"],
        model["radius"],
    )
