"""Per-customer features from a transaction log, and the transform that scales them.

Features (one row per customer, measured at `as_of` = the day after the last purchase in
the log, so a re-run on the same log gives the same numbers):
- recency_days: days since the last purchase
- frequency: number of purchases
- monetary_total, monetary_mean: spend in total and per purchase
- tenure_days: days since the first purchase
- interpurchase_days: mean gap between purchases; for one-time buyers their tenure (the
  gap is at least that long, and it keeps them apart from frequent buyers)
- items_per_purchase: only when the log has quantities

The transform (fitted on these rows, saved with the model, and rebuilt inside the ONNX
graph): log1p of the skewed columns, then standardization.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

BASE_FEATURES = (
    "recency_days",
    "frequency",
    "monetary_total",
    "monetary_mean",
    "tenure_days",
    "interpurchase_days",
)
SKEW_THRESHOLD = 1.0
"""Columns whose sample skewness exceeds this are log1p-transformed."""


def customer_features(transactions: pd.DataFrame) -> pd.DataFrame:
    """Feature table indexed by customer_id (sorted), in BASE_FEATURES order (+ items)."""
    as_of = transactions["timestamp"].max().normalize() + pd.Timedelta(days=1)
    grouped = transactions.groupby("customer_id", sort=True)
    first = grouped["timestamp"].min()
    last = grouped["timestamp"].max()
    frequency = grouped.size().astype(float)
    total = grouped["amount"].sum()
    features = pd.DataFrame(
        {
            "recency_days": (as_of - last).dt.days.astype(float),
            "frequency": frequency,
            "monetary_total": total,
            "monetary_mean": total / frequency,
            "tenure_days": (as_of - first).dt.days.astype(float),
        }
    )
    span = (last - first).dt.days.astype(float)
    features["interpurchase_days"] = np.where(
        frequency > 1, span / (frequency - 1).clip(lower=1), features["tenure_days"]
    )
    if transactions["quantity"].notna().any():
        features["items_per_purchase"] = grouped["quantity"].sum() / frequency
    return features


@dataclass(frozen=True)
class FeatureTransform:
    columns: tuple[str, ...]
    log_columns: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def fit(cls, table: pd.DataFrame) -> FeatureTransform:
        columns = tuple(table.columns)
        log_columns = tuple(
            c for c in columns if table[c].min() >= 0 and table[c].skew() > SKEW_THRESHOLD
        )
        logged = _log(table, log_columns)
        std = logged.std(ddof=0).clip(lower=1e-9)
        return cls(columns, log_columns, tuple(logged.mean().tolist()), tuple(std.tolist()))

    def apply(self, table: pd.DataFrame) -> np.ndarray:
        """(customers, features) float32, in `columns` order."""
        logged = _log(table[list(self.columns)], self.log_columns)
        return ((logged.to_numpy() - np.array(self.mean)) / np.array(self.std)).astype(np.float32)

    def to_dict(self) -> dict:
        return {k: list(v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> FeatureTransform:
        return cls(**{k: tuple(v) for k, v in data.items()})


def _log(table: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    out = table.astype(float).copy()
    for column in columns:
        out[column] = np.log1p(out[column].clip(lower=0))
    return out
