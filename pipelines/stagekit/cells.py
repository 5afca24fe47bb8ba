"""Reading CSV files the one way every text reader (tables, long-form time series,
unlabeled rows) does: UTF-8 with or without a BOM, each cell a number, and the same error
naming the file (and row and column) when one is not."""

from __future__ import annotations

import contextlib
import csv
import math
from collections.abc import Iterator
from pathlib import Path

from pipelines.stagekit.errors import UserError


@contextlib.contextmanager
def csv_rows(path: Path) -> Iterator[Iterator[list[str]]]:
    """A csv.reader over `path`; text that is not UTF-8, met anywhere while the block
    reads it, is one UserError naming the file and the byte."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            yield csv.reader(handle)
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not UTF-8 text (byte {exc.start}); save the CSV as UTF-8"
        ) from None


def number_cell(path: Path, line_no: int, column: str, text: str) -> float:
    """The number in one CSV cell, or a UserError naming the file, row and column."""
    try:
        value = float(text)
    except ValueError:
        raise UserError(
            f"{path}: row {line_no}, column {column!r}: {text!r} is not a number"
        ) from None
    if not math.isfinite(value):
        raise UserError(
            f"{path}: row {line_no}, column {column!r}: {text!r} is not a finite number"
        )
    return value
