"""Stage `segment`: customer segments two ways, the number of segments chosen by a sweep.

1. Features per customer (`features.py`), log1p of skewed columns, standardized.
2. K-means (torch, on Ray actors holding shards of the customers) for every k in
   [k_min, k_max]: inertia, silhouette, Davies-Bouldin, Calinski-Harabasz; k from params
   or the best silhouette.
3. At that k: the final K-means on the features, its stability across seeds, and its
   agreement with scikit-learn's KMeans on the same data (ARI).
4. An autoencoder trained on Ray Train, K-means on its bottleneck codes (optionally IDEC
   refinement), the same figures.
5. The served segmentation, `segment.method` (K-means or DBSCAN) in the space
   `segment.reduce` names (features, PCA, autoencoder codes, VAE codes): one of the two
   above when it is K-means on the features or on the autoencoder's codes, else fitted here
   (segmentation.py); its figures under `model` in the metrics.
6. Profiles (size, raw feature means, a descriptive name) and 2-D projections.

Writes `artifacts/segment/model/` (transform, centroids, autoencoder weights, the served
segmentation, profiles), `metrics/segment.json` and `plots/segment/`.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

from pipelines.stagekit import tracking
from pipelines.stagekit.atomic import output_directory, write_bytes, write_json
from pipelines.stagekit.config import Param, config_to_dict
from pipelines.stagekit.plots import k_sweep_png, learning_curves_png, projection_png, write_csv
from pipelines.stagekit.progress import Progress
from pipelines.stagekit.stage import stage_command
from pipelines.unsupervised.autoencoder import encode, refine, train_autoencoder
from pipelines.unsupervised.config import SegmentConfig
from pipelines.unsupervised.features import FeatureTransform
from pipelines.unsupervised.figures import internal_figures, mean_pairwise_ari, profiles
from pipelines.unsupervised.kmeans import ShardedPoints, kmeans_shards
from pipelines.unsupervised.segment_model import MODEL_FILE, feature_table, table_hash
from pipelines.unsupervised.segmentation import (
    Clustering,
    Space,
    cluster,
    model_entry,
    reduced_space,
    served_segmenter,
)

log = logging.getLogger(__name__)

STAGE = "segment"
SWEEP_COLUMNS = ("k", "inertia", "silhouette", "davies_bouldin", "calinski_harabasz")
# What segment reads of the `segment` section: the sweep, the autoencoder and its
# refinement; not the ingest's columns nor the export's choices.
SEGMENT_KEYS = (
    "k",
    "k_min",
    "k_max",
    "restarts",
    "max_iterations",
    "num_shards",
    "stability_seeds",
    "silhouette_sample",
    "autoencoder",
    "train",
    "refine_epochs",
    "refine_weight",
    "method",
    "reduce",
    "pca_components",
    "vae",
    "dbscan_min_samples",
    "dbscan_eps",
    "dbscan_max_core_points",
    "seed",
    "experiment",
)


@dataclasses.dataclass(frozen=True)
class Segmentation:
    """One way of segmenting: centroids in its space, labels, figures."""

    centroids: np.ndarray
    labels: np.ndarray
    inertia: float
    figures: dict


def sweep(points: ShardedPoints, x: np.ndarray, config: SegmentConfig) -> list[dict]:
    rows = []
    ks = range(config.k_min, config.k_max + 1)
    with Progress(len(ks), "k-sweep", log, unit="k") as progress:
        for k in ks:
            fit = points.fit(k, config.seed, config.restarts, config.max_iterations)
            rows.append(
                {
                    "k": k,
                    "inertia": fit.inertia,
                    **internal_figures(x, fit.labels, config.silhouette_sample, config.seed),
                }
            )
            progress.step(
                f"k={k}: inertia {fit.inertia:.1f}, silhouette {rows[-1]['silhouette']:.4f}, "
                f"Davies-Bouldin {rows[-1]['davies_bouldin']:.3f}"
            )
    return rows


def kmeans_at_k(
    points: ShardedPoints, x: np.ndarray, k: int, config: SegmentConfig
) -> Segmentation:
    """The final fit, and its stability over `stability_seeds` differently seeded fits."""
    fit = points.fit(k, config.seed, config.restarts, config.max_iterations)
    others = [
        points.fit(k, config.seed + s, config.restarts, config.max_iterations).labels
        for s in range(1, config.stability_seeds)
    ]
    figures = {
        "k": k,
        "inertia": fit.inertia,
        **internal_figures(x, fit.labels, config.silhouette_sample, config.seed),
        "stability_ari": mean_pairwise_ari([fit.labels, *others]),
    }
    return Segmentation(fit.centroids, fit.labels, fit.inertia, figures)


def sklearn_agreement(x: np.ndarray, labels: np.ndarray, k: int, config: SegmentConfig) -> float:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    reference = KMeans(k, n_init=config.restarts, random_state=config.seed).fit(x)
    return float(adjusted_rand_score(labels, reference.labels_))


def served_figures(
    config: SegmentConfig,
    transform: FeatureTransform,
    table,
    space: Space,
    served: Clustering,
    model: dict,
    autoencoder,
) -> dict:
    """The served segmentation's figures: its segments and noise, internal figures on the
    customers it places (noise left out), and how often the exported module's rule (the
    nearest centroid, or core point within eps) gives a customer the segment the fit did."""
    labels = served.labels
    placed = labels >= 0
    segmenter = served_segmenter(
        [c in transform.log_columns for c in transform.columns],
        transform.mean,
        transform.std,
        model,
        autoencoder,
    )
    with torch.no_grad():
        raw = torch.from_numpy(table[list(transform.columns)].to_numpy(dtype=np.float32))
        assigned = segmenter.eval()(raw)[0].numpy()
    return {
        "method": config.method,
        "reduce": config.reduce,
        "segments": int(labels.max()) + 1,
        "noise_share": float(np.mean(~placed)),
        **internal_figures(
            space.codes[placed], labels[placed], config.silhouette_sample, config.seed
        ),
        "assignment_agreement": float(np.mean(assigned == labels)),
        **space.figures,
        **served.figures,
    }


def segment(
    config: Annotated[SegmentConfig, Param("segment", reads=SEGMENT_KEYS)],
    data_dir: str = "data/raw/customers",
    output: str = "artifacts/segment/model",
    metrics_path: str = "metrics/segment.json",
    plots_dir: str = "plots/segment",
) -> dict:
    table = feature_table(data_dir)
    transform = FeatureTransform.fit(table)
    x = transform.apply(table)
    log.info(
        "%d customers x %d features (log1p: %s)",
        *x.shape,
        ", ".join(transform.log_columns) or "none",
    )
    plots = Path(plots_dir)
    with tracking.stage_run(
        config.experiment, STAGE, tracking.stage_tags(STAGE, table_hash(table))
    ) as run:
        run.log_params(
            {
                "segment": config_to_dict(config),
                "customers": len(x),
                "features": list(table.columns),
            }
        )
        with kmeans_shards(x, config.num_shards) as points:
            rows = sweep(points, x, config)
            k = config.k or max(rows, key=lambda r: r["silhouette"])["k"]
            log.info("k = %d (%s)", k, "from params" if config.k else "best silhouette")
            kmeans = kmeans_at_k(points, x, k, config)
        agreement = sklearn_agreement(x, kmeans.labels, k, config)
        log.info("torch K-means vs scikit-learn KMeans at k=%d: ARI %.4f", k, agreement)

        autoencoder, history = train_autoencoder(
            x, config.autoencoder, config.train, config.seed, run, f"{STAGE}_autoencoder"
        )
        codes = encode(autoencoder, x)
        with kmeans_shards(codes, config.num_shards) as points:
            coded = kmeans_at_k(points, codes, k, config)
        centroids, code_labels = coded.centroids, coded.labels
        if config.refine_epochs:
            autoencoder, centroids, codes, code_labels = refine(
                autoencoder,
                centroids,
                x,
                config.refine_epochs,
                config.refine_weight,
                config.train.lr,
                config.seed,
            )
        code_figures = internal_figures(codes, code_labels, config.silhouette_sample, config.seed)
        space = reduced_space(config, x, codes, run, STAGE)
        # K-means on the features or on the autoencoder's codes is fitted above already.
        fitted = {
            "none": (kmeans.labels, kmeans.centroids),
            "autoencoder": (code_labels, centroids),
        }
        if config.method == "kmeans" and config.reduce in fitted:
            labels, points = fitted[config.reduce]
            served = Clustering(labels, np.asarray(points, np.float32), None, math.inf, {})
        else:
            served = cluster(config, space, k)
        model = model_entry(config, space, served)
        served_profiles = profiles(table, served.labels)
        model_figures = served_figures(config, transform, table, space, served, model, autoencoder)
        model_figures.update(
            segment_sizes=[p["size"] for p in served_profiles],
            segment_names=[p["name"] for p in served_profiles],
        )
        log.info(
            "served: %s on %s, %d segments, %.1f%% noise, silhouette %.3f",
            config.method,
            config.reduce,
            model_figures["segments"],
            100 * model_figures["noise_share"],
            model_figures["silhouette"],
        )

        kmeans_profiles = profiles(table, kmeans.labels)
        code_profiles = profiles(table, code_labels)
        figures = {
            **kmeans.figures,
            "sklearn_agreement_ari": agreement,
            "autoencoder_silhouette": code_figures["silhouette"],
            "autoencoder_davies_bouldin": code_figures["davies_bouldin"],
            "autoencoder_stability_ari": coded.figures["stability_ari"],
            "autoencoder_vs_kmeans_ari": mean_pairwise_ari([kmeans.labels, code_labels]),
            "customers": len(x),
            "segment_sizes": [p["size"] for p in kmeans_profiles],
            "segment_names": [p["name"] for p in kmeans_profiles],
            "model": model_figures,
        }
        with output_directory(output) as staging:
            buffer = io.BytesIO()
            torch.save(
                {
                    "transform": transform.to_dict(),
                    "kmeans_centroids": torch.from_numpy(kmeans.centroids),
                    "autoencoder": config_to_dict(config.autoencoder),
                    "autoencoder_state": autoencoder.state_dict(),
                    "code_centroids": torch.from_numpy(np.asarray(centroids, dtype=np.float32)),
                    "k": k,
                    "model": model,
                },
                buffer,
            )
            write_bytes(staging / MODEL_FILE, buffer.getvalue())
            tracking.tag_output(run, staging / MODEL_FILE)
            write_json(
                staging / "profiles.json",
                {"kmeans": kmeans_profiles, "autoencoder": code_profiles, "model": served_profiles},
            )
            learning_curves_png(history, staging / "autoencoder_curves.png")
        write_csv(plots / "k_sweep.csv", rows, SWEEP_COLUMNS)
        write_csv(
            plots / "profiles.csv",
            [
                {
                    "model": m,
                    "segment": p["segment"],
                    "name": p["name"],
                    "size": p["size"],
                    **p["means"],
                }
                for m, ps in (("kmeans", kmeans_profiles), ("autoencoder", code_profiles))
                for p in ps
            ],
            ["model", "segment", "name", "size", *table.columns],
        )
        k_sweep_png(rows, k, plots / "k_sweep.png")
        projection_png(
            x,
            kmeans.labels,
            [p["name"] for p in kmeans_profiles],
            "K-means on the features (PCA)",
            plots / "kmeans_projection.png",
        )
        projection_png(
            codes,
            code_labels,
            [p["name"] for p in code_profiles],
            "K-means on autoencoder codes (PCA)",
            plots / "autoencoder_projection.png",
        )
        write_json(metrics_path, {**figures, tracking.RUN_ID_KEY: run.run_id})
        run.log_metrics({k_: float(v) for k_, v in figures.items() if isinstance(v, (int, float))})
        for image in ("k_sweep.png", "kmeans_projection.png", "autoencoder_projection.png"):
            run.log_artifact(plots / image, "plots")
        run.log_artifact(Path(output) / "profiles.json")
    for p in kmeans_profiles:
        log.info("segment %d (%5.1f%%): %s", p["segment"], 100 * p["share"], p["name"])
    return figures


if __name__ == "__main__":
    stage_command(segment, name=STAGE)
