"""Typed view of params.yaml: one frozen dataclass per section, validated on load.

Every field has a docstring (the reference for params.yaml). `load_config` rejects unknown
keys and wrong types with the offending key named, e.g. `params.yaml: train.lr: expected a
number, got 'fast'`, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from models.architecture import ArchitectureConfig
from models.autoencoder import AutoencoderConfig
from models.losses import LOSSES
from models.optimizers import OPTIMIZERS
from models.transformer import EncoderConfig
from pipelines.stagekit.errors import UserError


@dataclass(frozen=True)
class PrepareConfig:
    source: str = "data/raw/digits"
    """Raw data: an image folder (`<root>/<class>/*.png|jpg`), a CSV file, or a folder of
    MNIST-format IDX files (`train-images-idx3-ubyte[.gz]` beside `train-labels-idx1-ubyte[.gz]`,
    any number of such pairs; their labels are the class names)."""
    format: Literal["image_folder", "csv", "idx"] = "image_folder"
    """How to read `source`: image_folder, csv or idx."""
    task: Literal["classification", "regression"] = "classification"
    """What the label is: a class (classification) or a number (regression, CSV only)."""
    image_size: tuple[int, int] = (8, 8)
    """Images are resized to (height, width) pixels."""
    grayscale: bool = True
    """Convert images to one channel; false keeps RGB (three channels)."""
    label_column: str = "label"
    """CSV column holding the label."""
    feature_columns: tuple[str, ...] = ()
    """CSV feature columns, in order; empty means every column except the label."""
    val_fraction: float = 0.15
    """Fraction of examples held out for validation (early stopping)."""
    test_fraction: float = 0.15
    """Fraction of examples held out for the final test metrics."""
    seed: int = 0
    """Seed of the (stratified, for classification) split."""

    def __post_init__(self) -> None:
        if min(self.image_size) < 1:
            raise ValueError(f"image_size must be positive, got {list(self.image_size)}")
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be between 0 and 0.5, got {getattr(self, name)}")
        if self.format != "csv" and self.task != "classification":
            raise ValueError(
                f"task: {self.format} images are labeled with classes; use classification"
            )


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 40
    """Maximum number of passes over the training set."""
    batch_size: int = 64
    """Examples per step on each worker (gd and sgd override it: full batch / one example)."""
    optimizer: str = "adam"
    """One of: gd, sgd, minibatch_sgd, momentum, nesterov, adagrad, adadelta, rmsprop, adam, adamw."""
    lr: float = 0.002
    """Learning rate (the peak, with a schedule)."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After warm-up: keep `lr`, or decay it along a cosine to 0 at the last epoch."""
    warmup_epochs: int = 0
    """Epochs over which the learning rate rises linearly to `lr` (transformers need it)."""
    weight_decay: float = 0.0001
    """L2 penalty (decoupled for adamw)."""
    momentum: float = 0.9
    """Momentum of the momentum and nesterov optimizers."""
    loss: str = "cross_entropy"
    """One of: mse, mae, huber, bce, cross_entropy, kl_divergence."""
    huber_delta: float = 1.0
    """Where the huber loss turns from quadratic to linear."""
    early_stopping_patience: int = 8
    """Stop after this many epochs without a better validation loss (0 disables it)."""
    divergence_factor: float = 100.0
    """A training loss this many times the first epoch's (or NaN/inf) stops the run as diverged."""
    num_workers: int = 2
    """Ray Train workers (data-parallel replicas)."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """auto uses one GPU per worker when the Ray cluster has GPUs, else CPU."""
    amp: bool = True
    """Mixed precision (bf16 autocast) when training on a GPU; ignored on CPU."""
    max_failures: int = 2
    """Worker failures survived by restarting from the latest checkpoint."""
    seed: int = 0
    """Seed for weight initialisation and shuffling."""

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "num_workers", "lr", "huber_delta", "divergence_factor")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "early_stopping_patience", "max_failures", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.optimizer == "nesterov" and self.momentum == 0:
            raise ValueError("momentum must be > 0 for the nesterov optimizer")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer {self.optimizer!r} unknown; choose one of {', '.join(OPTIMIZERS)}"
            )
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r} unknown; choose one of {', '.join(LOSSES)}")


@dataclass(frozen=True)
class ExportConfig:
    opset: int = 18
    """ONNX opset version of the exported graph."""
    parity_atol: float = 0.0001
    """Largest allowed |onnxruntime - torch| on the test split; above it the stage fails."""
    registered_model: str = "dlpipe-classifier"
    """Name in the MLflow Model Registry."""
    alias: str = "champion"
    """Registry alias pointed at the new version (what serving loads)."""

    def __post_init__(self) -> None:
        if not 13 <= self.opset <= 21:
            raise ValueError(f"opset must be between 13 and 21, got {self.opset}")
        if self.parity_atol <= 0:
            raise ValueError(f"parity_atol must be > 0, got {self.parity_atol}")
        # MLflow reserves `latest` and version-like names (v1, V2 ...) for itself.
        if not re.fullmatch(r"[A-Za-z0-9_-]+", self.alias) or re.fullmatch(
            r"(?i)latest|v\d+", self.alias
        ):
            raise ValueError(
                f"alias {self.alias!r} is not allowed: use letters, digits, _ or -, "
                "and not 'latest' or v<number>"
            )
        if not self.registered_model.strip():
            raise ValueError("registered_model must not be empty")


@dataclass(frozen=True)
class PseudoLabelConfig:
    labeled_fraction: float = 0.05
    """Share of each class's training examples that keep their label (the rest become the
    unlabeled pool, their labels held aside for evaluation only). Ignored with `unlabeled_source`."""
    labeled_per_class: int = 0
    """When > 0, keep exactly this many labels per class instead of `labeled_fraction`."""
    unlabeled_source: str = ""
    """Your own unlabeled data: a folder of images (any layout) or a CSV with the feature
    columns. Empty: split the prepared training data as above."""
    split_seed: int = 0
    """Seed choosing which training examples keep their labels."""
    rounds: int = 3
    """Teacher -> student rounds after the first teacher; each student teaches the next round."""
    epochs_per_round: int = 30
    """Epochs of every teacher and student (the baseline gets (rounds + 1) times this)."""
    batch_size: int = 8
    """Examples per step on each worker in every round (a few labeled examples need small
    batches to get enough steps); the other optimisation settings come from `train`."""
    confidence_threshold: float = 0.9
    """A prediction becomes a pseudo-label only when its top class probability reaches this."""
    max_per_class: int = 0
    """Most pseudo-labels any class may receive per round, the most confident first
    (0: the pool size divided by the number of classes, so no class can flood the set)."""
    pseudo_weight: float = 1.0
    """Loss weight of a pseudo-labeled example once ramped up (labeled examples weigh 1)."""
    ramp_epochs: int = 10
    """Epochs over which the pseudo-label weight rises linearly to `pseudo_weight`
    (pseudo_weight / ramp_epochs in the first epoch); 0 or 1: full weight at once."""
    registered_model: str = "dlpipe-pseudolabel-classifier"
    """MLflow registry name of the final student (exported like the supervised model)."""
    experiment: str = "dlpipe-pseudolabel"
    """MLflow experiment: a parent run per stage execution, a child run per round."""

    def __post_init__(self) -> None:
        if not 0.0 < self.labeled_fraction < 1.0:
            raise ValueError(
                f"labeled_fraction must be between 0 and 1, got {self.labeled_fraction}"
            )
        if not 0.0 < self.confidence_threshold <= 1.0:
            raise ValueError(
                f"confidence_threshold must be in (0, 1], got {self.confidence_threshold}"
            )
        for name in ("labeled_per_class", "rounds", "max_per_class", "ramp_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("epochs_per_round", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pseudo_weight < 0:
            raise ValueError(f"pseudo_weight must be >= 0, got {self.pseudo_weight}")


def _mlm_train_defaults() -> TrainConfig:
    # A transformer wants AdamW, warm-up then decay, a small decoupled weight decay and more
    # epochs than the digits CNN; sized so `dvc repro pretrain_mlm` fits in about ten
    # minutes on 2 CPU cores.
    return TrainConfig(
        epochs=40,
        batch_size=16,
        optimizer="adamw",
        lr=0.002,
        lr_schedule="cosine",
        warmup_epochs=2,
        weight_decay=0.01,
        early_stopping_patience=5,
    )


@dataclass(frozen=True)
class MlmConfig:
    source: str = ""
    """Your corpus: a .txt file, a folder of .txt files (one document each) or a .csv file;
    empty: Python's bundled documentation topics (pydoc_data.topics). Keep it under
    data/sources/ so that editing it re-runs `ingest_corpus`."""
    text_column: str = "text"
    """CSV column holding the text (one document per row)."""
    document_split: Literal["auto", "line", "blank_line"] = "auto"
    """How a .txt file is cut into documents: per line, per blank-line separated paragraph,
    or auto (paragraphs when the file has blank lines)."""
    val_fraction: float = 0.1
    """Share of the words held out for validation, in whole documents."""
    split_seed: int = 0
    """Seed choosing which documents are held out."""
    vocab_size: int = 4096
    """WordPiece vocabulary size, special tokens included (trained on the training split)."""
    lowercase: bool = True
    """Lowercase (and strip accents) before tokenizing."""
    mask_probability: float = 0.15
    """Share of tokens chosen for prediction (80% [MASK], 10% random, 10% unchanged)."""
    model: EncoderConfig = field(default_factory=EncoderConfig)
    """The transformer encoder (max_length also sets the packed block length)."""
    train: TrainConfig = field(default_factory=_mlm_train_defaults)
    """Optimisation and Ray Train settings of the pretraining (`loss` is not used: the loss
    is the cross-entropy at masked positions)."""
    registered_model: str = "dlpipe-mlm"
    """MLflow registry name of the exported encoder."""
    experiment: str = "dlpipe-mlm"
    """MLflow experiment of the pretraining and export runs."""

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be between 0 and 0.5, got {self.val_fraction}")
        if not 0.0 < self.mask_probability < 1.0:
            raise ValueError(
                f"mask_probability must be between 0 and 1, got {self.mask_probability}"
            )
        if self.vocab_size < 16:
            raise ValueError(f"vocab_size must be >= 16, got {self.vocab_size}")


def _segment_train_defaults() -> TrainConfig:
    # Reconstruction of a few standardized columns: a larger batch and Adam converge in
    # seconds; the loss is the mean squared reconstruction error.
    return TrainConfig(
        epochs=30,
        batch_size=256,
        optimizer="adam",
        lr=0.001,
        weight_decay=0.0,
        loss="mse",
        early_stopping_patience=5,
    )


@dataclass(frozen=True)
class SegmentConfig:
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
    train: TrainConfig = field(default_factory=_segment_train_defaults)
    """Autoencoder training on Ray Train (`loss` is the reconstruction loss: mse, mae or huber)."""
    refine_epochs: int = 0
    """Epochs of IDEC refinement of the autoencoder + centroids (0: plain K-means on codes)."""
    refine_weight: float = 0.1
    """Weight of the clustering (KL) term against reconstruction during refinement."""
    serve: Literal["kmeans", "autoencoder"] = "kmeans"
    """Which model `export_segment` registers for /v1/segment: K-means on the features, or
    the autoencoder's encoder + K-means on its codes (both graphs are exported)."""
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
        if self.autoencoder.kind != "dense":
            raise ValueError(
                "segment.autoencoder.kind must be dense: customer features are a table, "
                "and the conv kind is for images (segment_digits)"
            )


@dataclass(frozen=True)
class SegmentDigitsConfig:
    autoencoder: AutoencoderConfig = field(
        default_factory=lambda: AutoencoderConfig(
            hidden_sizes=(32, 64, 128), bottleneck=10, kind="conv"
        )
    )
    """The autoencoder on each digit's 8x8 image (conv: 0.86 accuracy over 8 seeds in a
    single-process check, against about 0.84 for the dense kind)."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=100,
            batch_size=16,
            optimizer="adam",
            lr=0.001,
            weight_decay=0.0,
            loss="mse",
            early_stopping_patience=0,
        )
    )
    """Its training on Ray Train."""
    refine_epochs: int = 60
    """IDEC refinement epochs after K-means on the codes."""
    refine_weight: float = 0.5
    """Weight of the clustering term during refinement."""

    def __post_init__(self) -> None:
        if self.refine_epochs < 0 or self.refine_weight < 0:
            raise ValueError("refine_epochs and refine_weight must be >= 0")


TUNABLE_SECTIONS = ("train", "model")
"""Which params sections a search may set (`train.weight_decay`, `model.dropout`, ...)."""


@dataclass(frozen=True)
class TuneConfig:
    optimizers: tuple[str, ...] = OPTIMIZERS
    """Optimizers searched (default: the whole catalogue)."""
    lr: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {
            "default": (0.0003, 0.03),
            "gd": (0.03, 3.0),
            "sgd": (0.0001, 0.01),
            "minibatch_sgd": (0.003, 0.3),
            "momentum": (0.001, 0.1),
            "nesterov": (0.001, 0.1),
            "adagrad": (0.001, 0.1),
            "adadelta": (0.1, 10.0),
        }
    )
    """Learning-rate range [low, high] per optimizer, searched on a log scale; optimizers not
    listed use `default` (their families differ by orders of magnitude: full-batch gd wants
    ~1, per-example sgd ~1e-3, adadelta ~1)."""
    space: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "train.batch_size": (32, 64, 128),
            "train.weight_decay": (0.0, 0.0001, 0.001),
            "model.dropout": (0.0, 0.1, 0.3),
        }
    )
    """Other hyperparameters: dotted params key (`train.*` or `model.*`) -> the values to try."""
    search: Literal["random", "grid", "optuna"] = "random"
    """random: every optimizer, `samples` learning rates each (log-uniform in its range) with
    random picks of `space`; grid: every optimizer x `samples` log-spaced learning rates x
    every combination of `space`; optuna: TPE over all of it (needs `pip install optuna`)."""
    samples: int = 2
    """Trials per optimizer (random, grid: learning rates per optimizer; optuna: x optimizers)."""
    scheduler: Literal["asha", "pbt", "none"] = "asha"
    """asha: stop trials early that trail at a rung; pbt: population based training, every
    `perturbation_interval` epochs a trailing trial takes a leading trial's weights and
    settings, with its learning rate and `train.*` `space` values perturbed; none: every trial runs
    `epochs`."""
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    """Validation metric the search optimizes (accuracy up, loss down)."""
    epochs: int = 16
    """Epochs per trial at most (ASHA's max_t)."""
    grace_period: int = 1
    """ASHA: epochs every trial gets before it can be stopped (one epoch already shows a
    learning rate that is far off)."""
    reduction_factor: int = 3
    """ASHA: 1/reduction_factor of the trials go on at each rung (rungs at grace_period x
    reduction_factor^n epochs: 1, 3, 9 by default; Ray's 4 leaves only 1 and 4 below 12
    epochs, and used more epochs on the default search: benchmarks/README.md)."""
    perturbation_interval: int = 4
    """PBT: epochs between the times a trailing trial may take a leading trial's weights."""
    max_concurrent_trials: int = 2
    """Trials running at once (each takes `workers_per_trial` workers)."""
    workers_per_trial: int = 1
    """Ray Train workers per trial."""
    device: Literal["auto", "cpu", "gpu"] = "cpu"
    """Where trials train (auto: GPU when the cluster has one)."""
    seed: int = 0
    """Seed of the search (sampling) and of every trial's training."""
    experiment: str = "dlpipe-tune"
    """MLflow experiment: one parent run per search, one child run per trial."""

    def __post_init__(self) -> None:
        unknown = [o for o in self.optimizers if o not in OPTIMIZERS]
        if unknown or not self.optimizers:
            raise ValueError(
                f"optimizers: {unknown[0] if unknown else 'empty'!r} is not in the catalogue "
                f"({', '.join(OPTIMIZERS)})"
            )
        for name, (low, high) in self.lr.items():
            if name != "default" and name not in OPTIMIZERS:
                raise ValueError(f"lr.{name}: not an optimizer ({', '.join(OPTIMIZERS)})")
            if not 0 < low <= high:
                raise ValueError(f"lr.{name}: need 0 < low <= high, got [{low}, {high}]")
        if "default" not in self.lr and set(self.optimizers) - set(self.lr):
            raise ValueError("lr: give a `default` range or one for every optimizer searched")
        tunable = {
            section: {f.name for f in dataclasses.fields(cls)}
            for section, cls in (("train", TrainConfig), ("model", ArchitectureConfig))
        }
        for key, values in self.space.items():
            section, _, name = key.partition(".")
            if section not in TUNABLE_SECTIONS or name not in tunable[section]:
                raise ValueError(
                    f"space.{key}: not a train.* or model.* key (e.g. train.batch_size, "
                    "model.dropout)"
                )
            if name in ("optimizer", "lr", "epochs", "num_workers", "device", "seed"):
                raise ValueError(f"space.{key}: set by the search itself, not by `space`")
            if not values:
                raise ValueError(f"space.{key}: give at least one value")
        for name in (
            "samples",
            "epochs",
            "grace_period",
            "perturbation_interval",
            "max_concurrent_trials",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.scheduler == "pbt" and self.search == "optuna":
            raise ValueError(
                "scheduler: pbt picks the next settings itself and cannot follow a search "
                "algorithm; use search: random or grid with it"
            )
        if self.reduction_factor < 2:
            raise ValueError(f"reduction_factor must be >= 2, got {self.reduction_factor}")
        if self.workers_per_trial < 1:
            raise ValueError(f"workers_per_trial must be >= 1, got {self.workers_per_trial}")

    def lr_range(self, optimizer: str) -> tuple[float, float]:
        return self.lr.get(optimizer, self.lr.get("default", (0.0, 0.0)))


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = "dlpipe-supervised"
    """MLflow experiment of the supervised stages (the server comes from MLFLOW_TRACKING_URI)."""


@dataclass(frozen=True)
class PipelineConfig:
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    """The `prepare` stage: reading and splitting the raw data."""
    model: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    """The network trained by `train_supervised`."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation and Ray Train settings."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """ONNX export, parity check and registry."""
    pseudolabel: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    """Semi-supervised training by pseudo-labeling (`prepare_pseudolabel`, `train_pseudolabel`)."""
    mlm: MlmConfig = field(default_factory=MlmConfig)
    """Masked-language-model pretraining (`ingest_corpus`, `prepare_mlm`, `pretrain_mlm`)."""
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    """Customer segmentation (`ingest_transactions`, `segment`)."""
    segment_digits: SegmentDigitsConfig = field(default_factory=SegmentDigitsConfig)
    """Segmentation checked against labels: the same method on the digits (`segment_digits`)."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """The Ray Tune search over optimizers and learning rates (`tune`)."""
    tuned_params: str = "pipelines/tuning/untuned.yaml"
    """Settings `train_supervised` lays over `train` and `model`: an empty file by default;
    `artifacts/tune/best_params.yaml` trains with the best trial of the `tune` stage."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow experiment names."""


def load_config(path: str | Path = "params.yaml") -> PipelineConfig:
    """Read and validate params.yaml; raises UserError naming the file and key on any problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: file not found (run from the repository root)") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    return parse_section(PipelineConfig, raw, where=str(path), prefix="")


def with_tuned_params(config: PipelineConfig) -> PipelineConfig:
    """`config` with the `train` and `model` values of `config.tuned_params` laid over it
    (validated like params.yaml itself, errors naming that file)."""
    path = Path(config.tuned_params)
    if not path.is_file():
        hint = " (run `dvc repro tune` first)" if "tune" in path.parts else ""
        raise UserError(f"tuned_params: {path} not found{hint}")
    try:
        overlay = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(overlay, dict):
        raise UserError(f"{path}: expected a mapping with train and/or model keys")
    unknown = sorted(set(overlay) - set(TUNABLE_SECTIONS))
    if unknown:
        raise UserError(f"{path}: {unknown[0]}: only {', '.join(TUNABLE_SECTIONS)} can be tuned")
    changes = {}
    for section, values in overlay.items():
        merged = {**config_to_dict(getattr(config, section)), **(values or {})}
        cls = type(getattr(config, section))
        changes[section] = parse_section(cls, merged, where=str(path), prefix=f"{section}.")
    return dataclasses.replace(config, **changes)


def parse_section(cls: type, raw: Any, where: str, prefix: str) -> Any:
    """Build dataclass `cls` from the mapping `raw`, naming `prefix.key` in every error."""
    label = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise UserError(f"{where}: {label}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UserError(
            f"{where}: unknown key {prefix}{unknown[0]!s}; known keys here: {', '.join(sorted(known))}"
        )
    values = {
        name: _coerce(hints[name], value, where, f"{prefix}{name}") for name, value in raw.items()
    }
    try:
        return cls(**values)
    except ValueError as exc:
        raise UserError(f"{where}: {prefix}{exc}") from None


def _coerce(hint: Any, value: Any, where: str, key: str) -> Any:
    """Check `value` against the type `hint`, converting YAML lists to tuples and ints to floats."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    def fail(expected: str) -> UserError:
        return UserError(f"{where}: {key}: expected {expected}, got {value!r}")

    if dataclasses.is_dataclass(hint):
        return parse_section(hint, value, where, prefix=f"{key}.")
    if origin is Literal:
        if value not in args:
            raise fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unions are not supported in config: {key}")
    if origin is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        return {str(k): _coerce(args[1], v, where, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise fail(f"a list of {len(args)} values")
        return tuple(
            _coerce(a, v, where, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value))
        )
    if hint is bool:
        if not isinstance(value, bool):
            raise fail("true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    raise TypeError(f"unsupported config type {hint!r} for {key}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain, YAML/JSON-friendly data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))
