"""Customer transaction logs: the bundled CDNOW history and users' CSV files.

A transaction log becomes one table with columns customer_id (str), timestamp
(datetime64), amount (float) and quantity (float, NaN when not given). Every problem a
user can cause (a missing column, an unparseable date, a negative amount, an empty id) is
a UserError naming the file, the row (as numbered in the file, header = row 1) and the
column; nothing is written here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from pipelines.stagekit.errors import UserError

COLUMNS = ("customer_id", "timestamp", "amount", "quantity")


def cdnow_path() -> Path:
    """CDNOW_master.txt inside the installed `lifetimes` package, found without importing
    it (only the data file is used, not the package's modelling code)."""
    spec = importlib.util.find_spec("lifetimes")
    if spec is None or spec.origin is None:
        raise UserError("the `lifetimes` package (which bundles CDNOW) is not installed")
    path = Path(spec.origin).parent / "datasets" / "CDNOW_master.txt"
    if not path.is_file():
        raise UserError(f"{path}: CDNOW data file missing from the lifetimes package")
    return path


def read_cdnow(path: Path) -> pd.DataFrame:
    """CDNOW's whitespace-separated `id yyyymmdd number_of_cds dollar_value` rows."""
    raw = pd.read_csv(
        path,
        sep=r"\s+",
        header=0,  # " customer_id date number_of_cds dollar_value"
        names=["customer_id", "date", "quantity", "amount"],
        dtype={"customer_id": str, "date": str},
    )
    return pd.DataFrame(
        {
            "customer_id": raw["customer_id"].str.lstrip("0"),
            "timestamp": pd.to_datetime(raw["date"], format="%Y%m%d"),
            "amount": raw["amount"].astype(float),
            "quantity": raw["quantity"].astype(float),
        }
    )


def read_transaction_csv(
    path: str | Path,
    customer_column: str = "customer_id",
    timestamp_column: str = "timestamp",
    amount_column: str = "amount",
    quantity_column: str = "",
) -> pd.DataFrame:
    """A user's log: one row per purchase. Timestamps in ISO 8601 (2024-03-01 or
    2024-03-01T10:00) or yyyymmdd; amounts >= 0; quantity optional."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: transaction file not found")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable CSV file ({exc})") from None
    wanted = [customer_column, timestamp_column, amount_column]
    if quantity_column:
        wanted.append(quantity_column)
    for column in wanted:
        if column not in table.columns:
            raise UserError(
                f"{path}: no column {column!r}; columns: {', '.join(table.columns)} "
                "(set segment.*_column in params.yaml)"
            )
    if table.empty:
        raise UserError(f"{path}: no transactions")
    ids = table[customer_column].str.strip()
    _fail_at(path, ids == "", customer_column, "empty customer id", table)
    timestamps = _parse_timestamps(table[timestamp_column].str.strip())
    _fail_at(
        path, timestamps.isna(), timestamp_column, "not a date (use ISO 8601 or yyyymmdd)", table
    )
    amounts = pd.to_numeric(table[amount_column], errors="coerce")
    _fail_at(path, amounts.isna() | ~np.isfinite(amounts), amount_column, "not a number", table)
    _fail_at(path, amounts < 0, amount_column, "negative amount", table)
    if quantity_column:
        quantity = pd.to_numeric(table[quantity_column], errors="coerce")
        _fail_at(path, quantity.isna() | (quantity < 0), quantity_column, "not a count >= 0", table)
    else:
        quantity = pd.Series(np.nan, index=table.index)
    return pd.DataFrame(
        {
            "customer_id": ids,
            "timestamp": timestamps,
            "amount": amounts.astype(float),
            "quantity": quantity.astype(float),
        }
    )


def _parse_timestamps(values: pd.Series) -> pd.Series:
    compact = values.str.fullmatch(r"\d{8}")
    parsed = pd.to_datetime(values.where(~compact), errors="coerce", format="ISO8601")
    parsed[compact] = pd.to_datetime(values[compact], errors="coerce", format="%Y%m%d")
    return parsed


def _fail_at(path: Path, bad: pd.Series, column: str, problem: str, table: pd.DataFrame) -> None:
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        count = int(bad.sum())
        value = table[column].iloc[first]
        more = f" ({count - 1} more rows like it)" if count > 1 else ""
        raise UserError(f"{path}: row {first + 2}, column {column!r}: {problem}: {value!r}{more}")


TRANSACTIONS_FILE = "transactions.csv"
"""What `ingest_transactions` writes for a transaction log..."""
FEATURES_FILE = "features.csv"
"""...or for a per-customer feature table."""


def read_ingested(directory: str | Path) -> tuple[str, pd.DataFrame]:
    """("transactions" | "features", the table) written by `ingest_transactions`."""
    directory = Path(directory)
    if (directory / FEATURES_FILE).is_file():
        return "features", pd.read_csv(
            directory / FEATURES_FILE, dtype={"customer_id": str}, index_col=0
        )
    if (directory / TRANSACTIONS_FILE).is_file():
        table = pd.read_csv(
            directory / TRANSACTIONS_FILE, dtype={"customer_id": str}, parse_dates=["timestamp"]
        )
        return "transactions", table
    raise UserError(f"{directory}: no ingested customer data; run ingest_transactions first")
