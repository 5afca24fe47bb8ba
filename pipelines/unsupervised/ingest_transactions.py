"""Stage `ingest_transactions`: copy the customer data into `data/raw/customers/` for DVC.

By default the CDNOW purchase history bundled with the `lifetimes` package (69,659
purchases by 23,570 customers, 1997-1998); or `segment.source`: your transaction log or
per-customer feature table. The log is checked row by row (dates, amounts, ids) and
written in one format, `transactions.csv` (customer_id, timestamp, amount, quantity), or
`features.csv` for a feature table, so later stages read exactly what DVC versions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd

from pipelines.stagekit.atomic import output_directory, write_json
from pipelines.stagekit.config import Param
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.stage import stage_command
from pipelines.unsupervised.config import SegmentConfig
from pipelines.unsupervised.transactions import (
    FEATURES_FILE,
    TRANSACTIONS_FILE,
    cdnow_path,
    read_cdnow,
    read_transaction_csv,
)

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"
# What the ingest reads of the `segment` section: where the data is and how it is laid out.
INGEST_KEYS = (
    "source",
    "format",
    "customer_column",
    "timestamp_column",
    "amount_column",
    "quantity_column",
)


def read_feature_table(path: str | Path, customer_column: str) -> pd.DataFrame:
    """A user's per-customer table: an id column and numeric feature columns."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: feature table not found")
    table = pd.read_csv(path, dtype={customer_column: str})
    if customer_column not in table.columns:
        raise UserError(f"{path}: no column {customer_column!r} (set segment.customer_column)")
    features = table.drop(columns=[customer_column])
    for column in features.columns:
        values = pd.to_numeric(features[column], errors="coerce")
        bad = values.isna() | ~np.isfinite(values)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise UserError(
                f"{path}: row {row + 2}, column {column!r}: not a number: "
                f"{features[column].iloc[row]!r}"
            )
        features[column] = values.astype(float)
    if features.shape[1] < 2:
        raise UserError(f"{path}: need at least 2 feature columns besides {customer_column!r}")
    if table[customer_column].duplicated().any():
        duplicate = table[customer_column][table[customer_column].duplicated()].iloc[0]
        raise UserError(f"{path}: customer {duplicate!r} appears more than once")
    features.index = table[customer_column].rename("customer_id")
    return features


def ingest_transactions(
    segment: Annotated[SegmentConfig, Param("segment", reads=INGEST_KEYS)],
    output: str = "data/raw/customers",
) -> dict:
    with output_directory(output) as staging:
        if segment.format == "features":
            table = read_feature_table(segment.source, segment.customer_column)
            table.to_csv(staging / FEATURES_FILE)
            summary = {"source": segment.source, "format": "features", "customers": len(table)}
        else:
            if segment.source:
                log_table = read_transaction_csv(
                    segment.source,
                    segment.customer_column,
                    segment.timestamp_column,
                    segment.amount_column,
                    segment.quantity_column,
                )
            else:
                log_table = read_cdnow(cdnow_path())
            log_table.to_csv(
                staging / TRANSACTIONS_FILE, index=False, date_format="%Y-%m-%dT%H:%M:%S"
            )
            summary = {
                "source": segment.source or "lifetimes:CDNOW_master.txt",
                "format": "transactions",
                "transactions": len(log_table),
                "customers": int(log_table["customer_id"].nunique()),
            }
        write_json(staging / SOURCE_FILE, summary)
    log.info("customer data %s -> %s: %s", summary["source"], output, summary)
    return summary


if __name__ == "__main__":
    stage_command(ingest_transactions)
