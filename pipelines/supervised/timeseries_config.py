"""params.yaml section of the time-series stages: `timeseries`.

Its own module, not config.py's: it holds a network (`timeseries.model`), and the image
`prepare` stage, which reads config.py, must not re-run when the networks' code changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models.architecture import RECURRENT_KINDS, ArchitectureConfig
from pipelines.stagekit.config import Section, TrainConfig
from pipelines.supervised.sequence_baselines import BASELINES

# A bidirectional LSTM summarising each sequence from both ends; JapaneseVowels' 270
# training series take seconds an epoch, and its best validation loss comes within 30.
TIMESERIES_MODEL = ArchitectureConfig(
    kind="lstm", recurrent_size=64, bidirectional=True, hidden_sizes=(64,), dropout=0.1
)
TIMESERIES_TRAIN = TrainConfig(epochs=30, batch_size=16, lr=0.002, early_stopping_patience=10)


@dataclass(frozen=True, repr=False)
class TimeseriesConfig(Section):
    dataset: str = "JapaneseVowels"
    """The UCR/UEA set `ingest_timeseries` writes to data/raw/timeseries, one of those the
    aeon package bundles (JapaneseVowels, BasicMotions, GunPoint, ArrowHead,
    ItalyPowerDemand, OSULeaf ...)."""
    source: str = "data/raw/timeseries"
    """What `prepare_timeseries` reads: a folder holding `<name>_TRAIN.ts` and
    `<name>_TEST.ts` (format ts), or a long-form CSV file (format csv)."""
    format: Literal["ts", "csv"] = "ts"
    """ts: the UCR/UEA archive's files, with their official train/test split. csv: one row
    per (series, time step): `series_column`, `time_column`, the channels, `label_column`."""
    series_column: str = "series"
    """CSV column naming the series a row belongs to."""
    time_column: str = "step"
    """CSV column ordering a series' rows (a number)."""
    label_column: str = "label"
    """CSV column holding the series' class (the same on all its rows)."""
    channel_columns: tuple[str, ...] = ()
    """CSV channel columns, in order; empty means every other column."""
    val_fraction: float = 0.2
    """Share of the training series held out for validation (early stopping)."""
    test_fraction: float = 0.3
    """Share of the series held out for testing (csv only: a .ts set has its own test file)."""
    max_length: int = 1000
    """The longest series accepted, in `prepare_timeseries` and over HTTP."""
    seed: int = 0
    """Seed of the (stratified) splits."""
    kinds: tuple[str, ...] = ("lstm", "gru")
    """The recurrent networks `train_timeseries` trains, each with `model`'s other
    settings; `model.kind` must be one of them."""
    baselines: tuple[str, ...] = tuple(BASELINES)
    """Trained on the same split beside the networks (aeon): dtw_1nn (1-nearest neighbour
    under dynamic time warping), rocket, minirocket (random convolution kernels + a ridge
    classifier)."""
    model: ArchitectureConfig = TIMESERIES_MODEL
    """The network: `kind` is the one evaluated, exported and registered; the other
    `kinds` train beside it with the same settings, for the table."""
    train: TrainConfig = TIMESERIES_TRAIN
    """Optimisation and Ray Train settings of every network's run."""
    registered_model: str = "dlpipe-timeseries-classifier"
    """MLflow registry name of the exported network."""
    experiment: str = "dlpipe-timeseries"
    """MLflow experiment of the time-series runs."""

    def __post_init__(self) -> None:
        for name in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name} must be between 0 and 0.5, got {getattr(self, name)}")
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")
        unknown = [k for k in self.kinds if k not in RECURRENT_KINDS]
        if unknown or not self.kinds:
            raise ValueError(
                f"kinds: {unknown or 'empty'}; choose from {', '.join(RECURRENT_KINDS)}"
            )
        if self.model.kind not in self.kinds:
            raise ValueError(
                f"model.kind: {self.model.kind!r} (the network exported) is not one of "
                f"kinds {list(self.kinds)}"
            )
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"baselines: {unknown}; choose from {', '.join(BASELINES)}")
