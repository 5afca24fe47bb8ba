"""params.yaml sections of the unsupervised stages: `segment` (customers),
`segment_digits` (the same method checked against labels) and `generate` (VAE and GAN)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from models.autoencoder import AutoencoderConfig
from models.gan import GanConfig
from models.vae import VaeConfig
from pipelines.stagekit.config import Section, TrainConfig

# Reconstruction of a few standardized columns: a larger batch and Adam converge in seconds;
# the loss is the mean squared reconstruction error. (A frozen instance is a safe shared default.)
SEGMENT_TRAIN = TrainConfig(
    epochs=30,
    batch_size=256,
    optimizer="adam",
    lr=0.001,
    weight_decay=0.0,
    loss="mse",
    early_stopping_patience=5,
)


@dataclass(frozen=True, repr=False)
class SegmentConfig(Section):
    source: str = ""
    """Your data: a transaction log CSV (`format: transactions`) or a per-customer feature
    table CSV (`format: features`); empty: the CDNOW purchase history bundled with the
    `lifetimes` package. Keep it under data/sources/ so that editing it re-runs the ingest."""
    format: Literal["transactions", "features"] = "transactions"
    """What `source` holds: one row per purchase, or one row per customer."""
    customer_column: str = "customer_id"
    """Column with the customer id (both formats)."""
    timestamp_column: str = "timestamp"
    """Purchase date/time column: ISO 8601 (2024-03-01, 2024-03-01T10:00) or yyyymmdd."""
    amount_column: str = "amount"
    """Purchase amount column (>= 0)."""
    quantity_column: str = ""
    """Optional items-per-purchase column ("" when the log has none)."""
    k: int = 0
    """Number of segments; 0 picks the k in [k_min, k_max] with the best silhouette."""
    k_min: int = 3
    """Smallest k of the sweep (2 tends to win on silhouette by splitting active from
    lapsed customers, which says little)."""
    k_max: int = 8
    """Largest k of the sweep."""
    restarts: int = 5
    """K-means runs from different k-means++ seeds per fit; the lowest inertia is kept."""
    max_iterations: int = 300
    """Lloyd iterations per run at most."""
    num_shards: int = 2
    """Ray actors holding a shard of the points each (K-means is computed on them)."""
    stability_seeds: int = 3
    """K-means fits with different seeds whose mean pairwise ARI is the stability figure."""
    silhouette_sample: int = 5000
    """Points (seeded sample) the silhouette is computed on: it costs O(n^2)."""
    autoencoder: AutoencoderConfig = field(
        default_factory=lambda: AutoencoderConfig(hidden_sizes=(32, 16), bottleneck=3)
    )
    """The autoencoder whose bottleneck codes are clustered (narrower than the features,
    or it learns the identity)."""
    train: TrainConfig = SEGMENT_TRAIN
    """Autoencoder training on Ray Train (`loss` is the reconstruction loss: mse, mae or huber)."""
    refine_epochs: int = 0
    """Epochs of IDEC refinement of the autoencoder + centroids (0: plain K-means on codes)."""
    refine_weight: float = 0.1
    """Weight of the clustering (KL) term against reconstruction during refinement."""
    method: Literal["kmeans", "dbscan"] = "kmeans"
    """How the served segmentation clusters: K-means at the sweep's k, or DBSCAN
    (scikit-learn's), whose noise customers form a segment of their own (-1, "noise")."""
    reduce: Literal["none", "pca", "autoencoder", "vae"] = "none"
    """The space it clusters in: the standardized features, their first `pca_components`
    principal components, the autoencoder's codes (after refinement, if any) or a VAE's
    codes (its posterior means). K-means on the features and on the autoencoder's codes
    are computed either way, as the figures to compare with."""
    pca_components: int = 3
    """Principal components of the `pca` space (the autoencoder's bottleneck size)."""
    vae: VaeConfig = VaeConfig(hidden_sizes=(32, 16), latent=3, likelihood="gaussian")
    """The VAE of the `vae` space (gaussian: the features are standardized, not pixels);
    trained with `train`."""
    dbscan_min_samples: int = 20
    """DBSCAN's density: customers within `dbscan_eps` a core customer needs, itself
    included."""
    dbscan_eps: float = 0.0
    """DBSCAN's radius in the clustered space; 0 reads it off the k-distance curve's knee."""
    dbscan_max_core_points: int = 2000
    """Core points the exported graph keeps (a seeded sample when DBSCAN finds more): a new
    customer joins the segment of its nearest kept core point within eps, else is noise.
    More points, closer agreement with DBSCAN's own labels, a larger graph."""
    seed: int = 0
    """Seed of K-means initialisation and of the validation split for early stopping."""
    registered_model: str = "dlpipe-segment"
    """MLflow registry name of the exported segmentation graph."""
    experiment: str = "dlpipe-segment"
    """MLflow experiment of the segmentation runs."""

    def __post_init__(self) -> None:
        if not 2 <= self.k_min <= self.k_max:
            raise ValueError(f"need 2 <= k_min <= k_max, got {self.k_min}, {self.k_max}")
        if self.k == 1 or self.k < 0:
            raise ValueError(f"k must be 0 (choose by silhouette) or >= 2, got {self.k}")
        for name in ("restarts", "max_iterations", "num_shards", "stability_seeds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.silhouette_sample < 100:
            raise ValueError(f"silhouette_sample must be >= 100, got {self.silhouette_sample}")
        if self.refine_epochs < 0 or self.refine_weight < 0:
            raise ValueError("refine_epochs and refine_weight must be >= 0")
        if self.pca_components < 1 or self.dbscan_min_samples < 2 or self.dbscan_eps < 0:
            raise ValueError(
                "need pca_components >= 1, dbscan_min_samples >= 2 and dbscan_eps >= 0"
            )
        if self.dbscan_max_core_points < 1:
            raise ValueError("dbscan_max_core_points must be >= 1")
        if self.vae.likelihood != "gaussian":
            raise ValueError(
                "segment.vae.likelihood must be gaussian: customer features are standardized "
                "values, not pixels in [0, 1]"
            )
        if self.autoencoder.kind != "dense":
            raise ValueError(
                "segment.autoencoder.kind must be dense: customer features are a table, "
                "and the conv kind is for images (segment_digits)"
            )


@dataclass(frozen=True, repr=False)
class SegmentDigitsConfig(Section):
    autoencoder: AutoencoderConfig = field(
        default_factory=lambda: AutoencoderConfig(
            hidden_sizes=(32, 64, 128), bottleneck=10, kind="conv"
        )
    )
    """The autoencoder on each digit's 8x8 image (conv: 0.86 accuracy over 8 seeds in a
    single-process check, against about 0.84 for the dense kind)."""
    train: TrainConfig = replace(
        SEGMENT_TRAIN, epochs=100, batch_size=16, early_stopping_patience=0
    )
    """Its training on Ray Train: the customers' autoencoder training, longer, in smaller
    batches and to the last epoch."""
    refine_epochs: int = 60
    """IDEC refinement epochs after K-means on the codes."""
    refine_weight: float = 0.5
    """Weight of the clustering term during refinement."""
    pca_components: int = 10
    """Principal components the PCA rows of the table cluster in (the autoencoder's
    bottleneck by default, so the two reductions compare at one size)."""
    vae: VaeConfig = VaeConfig(hidden_sizes=(256, 128), latent=10)
    """The VAE whose codes (posterior means) the VAE rows of the table cluster in: the
    `generate` stage's network, with a 10-d latent like the other two reductions."""
    vae_train: TrainConfig = TrainConfig(
        epochs=100, batch_size=64, lr=0.002, weight_decay=0.0, early_stopping_patience=0
    )
    """Its training on Ray Train (the lowest validation loss's weights are kept)."""
    dbscan_min_samples: int = 10
    """DBSCAN's density: points within `dbscan_eps` a core point needs, itself included."""
    dbscan_eps: float = 0.0
    """DBSCAN's radius; 0 reads it off each space's k-distance curve at its knee."""

    def __post_init__(self) -> None:
        if self.refine_epochs < 0 or self.refine_weight < 0:
            raise ValueError("refine_epochs and refine_weight must be >= 0")
        if self.pca_components < 1 or self.dbscan_min_samples < 2 or self.dbscan_eps < 0:
            raise ValueError(
                "need pca_components >= 1, dbscan_min_samples >= 2 and dbscan_eps >= 0"
            )


@dataclass(frozen=True, repr=False)
class GenerateConfig(Section):
    vae: VaeConfig = VaeConfig()
    """The variational autoencoder (a dense encoder and decoder over the 8x8 digits)."""
    vae_train: TrainConfig = TrainConfig(
        epochs=200, batch_size=64, lr=0.002, weight_decay=0.0, early_stopping_patience=0
    )
    """Its training on Ray Train (the lowest validation loss's weights are kept). In a
    single-process check its samples' Fréchet distance still fell at 60 epochs (119)."""
    gan: GanConfig = GanConfig()
    """The DCGAN: generator and discriminator."""
    gan_train: TrainConfig = TrainConfig(
        epochs=100,
        batch_size=64,
        lr=0.0002,
        beta1=0.5,
        weight_decay=0.0,
        early_stopping_patience=0,
    )
    """Its training on Ray Train: DCGAN's Adam (lr 0.0002, beta1 0.5); the last epoch's
    weights are kept (a GAN's validation losses do not rank its samples)."""
    sample_every: int = 10
    """Epochs between the grids of 100 samples each run logs to MLflow (0: only the last)."""
    serve: Literal["vae", "gan"] = "gan"
    """Which generator `export_generate` registers for /v1/generate (both are exported)."""
    registered_model: str = "dlpipe-generator"
    """MLflow registry name of the served generator."""
    experiment: str = "dlpipe-generate"
    """MLflow experiment of the generative runs."""

    def __post_init__(self) -> None:
        if self.sample_every < 0:
            raise ValueError(f"sample_every must be >= 0, got {self.sample_every}")
