"""params.yaml sections of the supervised stages: `prepare`, `evaluate` and `tracking` (the network is
`model`, models/architecture.py; training is the shared `train`, pipelines/stagekit/config.py).
The time-series chain's section is in timeseries_config.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipelines.stagekit.config import Section


@dataclass(frozen=True, repr=False)
class PrepareConfig(Section):
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


@dataclass(frozen=True, repr=False)
class EvaluateConfig(Section):
    folds: int = 0
    """k-fold cross-validation (stage `cross_validate`) for small labeled sets: k >= 2 trains
    k more models, each tested on one k-th of every labeled example (train, val and test
    pooled) and trained on the rest, and reports the mean and spread of their figures; 0
    (the default) skips it. One test split of a few dozen examples gives a rough figure; k
    folds test every example once."""
    seed: int = 0
    """Seed of the (stratified, for classification) fold assignment."""

    def __post_init__(self) -> None:
        if self.folds == 1 or self.folds < 0:
            raise ValueError(f"folds must be 0 (off) or at least 2, got {self.folds}")


@dataclass(frozen=True, repr=False)
class TrackingConfig(Section):
    experiment: str = "dlpipe-supervised"
    """MLflow experiment of the supervised stages (the server comes from MLFLOW_TRACKING_URI)."""
