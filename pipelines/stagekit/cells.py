"""One cell of a CSV file as a number: what every text reader (tables, long-form time
series, unlabeled rows) parses, with the same error naming the file, row and column."""

from __future__ import annotations

import math
from pathlib import Path

from pipelines.stagekit.errors import UserError


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
