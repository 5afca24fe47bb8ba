"""Stage `segment_digits`: the segmentation method where the right answer is known.

The digits images (labels hidden from every fit) are clustered into 10 groups: K-means on
the raw pixels, and K-means on autoencoder codes followed by IDEC refinement (the headline
figures); and a table of every method in every space: K-means and DBSCAN on the raw pixels,
their first principal components, the autoencoder's codes and a VAE's codes. Each is scored against the
labels (Hungarian-matched accuracy, NMI, ARI; DBSCAN's noise counted as one more cluster,
its share reported) in `metrics/segment_digits.json`. The K-means, autoencoder and
refinement code is the one `segment` uses on customers.
"""

from __future__ import annotations

import logging
from typing import Annotated

import numpy as np

from pipelines.stagekit import tracking
from pipelines.stagekit.atomic import write_json
from pipelines.stagekit.config import Param, config_to_dict
from pipelines.stagekit.dataset import SPLITS, load_prepared
from pipelines.stagekit.metrics import accuracy_figures
from pipelines.stagekit.stage import stage_command
from pipelines.unsupervised.autoencoder import (
    encode,
    refine,
    train_autoencoder,
    train_vae,
    vae_codes,
)
from pipelines.unsupervised.config import SegmentConfig, SegmentDigitsConfig
from pipelines.unsupervised.density import dbscan_labels, knee_eps, pca_codes
from pipelines.unsupervised.figures import label_agreement
from pipelines.unsupervised.kmeans import kmeans_shards

log = logging.getLogger(__name__)

STAGE = "segment_digits"
# What it shares with `segment`: the K-means settings, the seed and the MLflow experiment.
SEGMENT_KEYS = ("restarts", "max_iterations", "num_shards", "seed", "experiment")


def segment_digits(
    segment: Annotated[SegmentConfig, Param("segment", reads=SEGMENT_KEYS)],
    digits: Annotated[SegmentDigitsConfig, Param("segment_digits")],
    data_dir: str = "data/prepared/supervised",
    metrics_path: str = "metrics/segment_digits.json",
) -> dict:
    data = load_prepared(data_dir)
    x = np.concatenate([data.x(s) for s in SPLITS]).reshape(-1, int(np.prod(data.input_shape)))
    truth = np.concatenate([data.y(s) for s in SPLITS])
    k = len(data.class_names or ())
    with tracking.stage_run(
        segment.experiment, STAGE, tracking.stage_tags(STAGE, data.data_hash)
    ) as run:
        run.log_params({"segment_digits": config_to_dict(digits), "k": k, "examples": len(x)})
        with kmeans_shards(x, segment.num_shards) as points:
            raw = points.fit(k, segment.seed, max(segment.restarts, 10), segment.max_iterations)
        raw_scores = label_agreement(raw.labels, truth)
        log.info(
            "K-means on pixels: accuracy %.4f, NMI %.4f", raw_scores["accuracy"], raw_scores["nmi"]
        )
        autoencoder, _ = train_autoencoder(
            x,
            digits.autoencoder,
            digits.train,
            segment.seed,
            run,
            f"{STAGE}_autoencoder",
            tuple(data.input_shape),
            lr_key="segment_digits.train.lr",
        )
        codes = encode(autoencoder, x)
        with kmeans_shards(codes, segment.num_shards) as points:
            coded = points.fit(k, segment.seed, max(segment.restarts, 10), segment.max_iterations)
        code_scores = label_agreement(coded.labels, truth)
        log.info(
            "K-means on codes: accuracy %.4f, NMI %.4f", code_scores["accuracy"], code_scores["nmi"]
        )
        labels = coded.labels
        if digits.refine_epochs:
            *_, labels = refine(
                autoencoder,
                coded.centroids,
                x,
                digits.refine_epochs,
                digits.refine_weight,
                digits.train.lr,
                segment.seed,
            )
        scores = label_agreement(labels, truth)
        pca, explained = pca_codes(x, digits.pca_components, segment.seed)
        with kmeans_shards(pca, segment.num_shards) as points:
            on_pca = points.fit(k, segment.seed, max(segment.restarts, 10), segment.max_iterations)
        images = x.reshape(-1, *data.input_shape)
        vae = train_vae(
            images,
            digits.vae,
            digits.vae_train,
            segment.seed,
            run,
            f"{STAGE}_vae",
            lr_key="segment_digits.vae_train.lr",
        )
        vae_points = vae_codes(vae, images)
        with kmeans_shards(vae_points, segment.num_shards) as points:
            on_vae = points.fit(k, segment.seed, max(segment.restarts, 10), segment.max_iterations)
        spaces = {"raw": x, "pca": pca, "autoencoder": codes, "vae": vae_points}
        kmeans_labels = {
            "raw": raw.labels,
            "pca": on_pca.labels,
            "autoencoder": coded.labels,
            "vae": on_vae.labels,
        }
        table = {}
        for space, points in spaces.items():
            table[f"kmeans/{space}"] = {**label_agreement(kmeans_labels[space], truth)}
            eps = digits.dbscan_eps or knee_eps(points, digits.dbscan_min_samples)
            found = dbscan_labels(points, eps, digits.dbscan_min_samples)
            table[f"dbscan/{space}"] = {
                **label_agreement(found, truth),
                "eps": eps,
                "clusters": int(found.max() + 1),
                "noise_share": float(np.mean(found == -1)),
            }
        for row in table.values():
            row.setdefault("noise_share", 0.0)
        for name, row in table.items():
            log.info(
                "%-22s accuracy %.4f, NMI %.4f, ARI %.4f, noise %.1f%%",
                name,
                row["accuracy"],
                row["nmi"],
                row["ari"],
                100 * row["noise_share"],
            )
        figures = {
            **scores,
            "kmeans_accuracy": raw_scores["accuracy"],
            "kmeans_nmi": raw_scores["nmi"],
            "kmeans_ari": raw_scores["ari"],
            "autoencoder_kmeans_accuracy": code_scores["accuracy"],
            "autoencoder_kmeans_nmi": code_scores["nmi"],
            "k": k,
            "examples": len(x),
            "pca_explained_variance": explained,
            "table": table,
        }
        for name in ("accuracy", "kmeans_accuracy", "autoencoder_kmeans_accuracy"):
            figures.update(accuracy_figures(name, round(figures[name] * len(x)), len(x)))
        write_json(metrics_path, {**figures, tracking.RUN_ID_KEY: run.run_id})
        run.log_metrics({key: float(v) for key, v in figures.items() if key != "table"})
        run.log_metrics(
            {f"{name}/{key}": float(v) for name, row in table.items() for key, v in row.items()}
        )
    log.info(
        "digits, labels hidden: autoencoder + K-means%(idec)s accuracy %(accuracy).4f, "
        "NMI %(nmi).4f, ARI %(ari).4f (K-means on pixels: %(kmeans_accuracy).4f, %(kmeans_nmi).4f)",
        {**figures, "idec": " + IDEC" if digits.refine_epochs else ""},
    )
    return figures


if __name__ == "__main__":
    stage_command(segment_digits, name=STAGE)
