"""Time series: reading them (UCR/UEA `.ts` files, long-form CSV) and the padded layout
every later step uses.

A set of sequences of one or more channels and possibly different lengths becomes one
float32 array (N, T, C), each sequence followed by NaN up to the longest one's length T.
The recurrent networks find each sequence's end there (models/recurrent.py); NaN cannot
be a real value, since every reader and the HTTP API refuse non-finite ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.stagekit.cells import csv_rows, number_cell
from pipelines.stagekit.errors import UserError


@dataclass(frozen=True)
class SequenceSet:
    x: np.ndarray
    """float32 (N, T, C): each sequence, then NaN up to the longest length T."""
    labels: list[str]
    """Each sequence's class name, as the file writes it."""
    channel_names: tuple[str, ...]


def pad_sequences(sequences: Sequence[np.ndarray], steps: int | None = None) -> np.ndarray:
    """(T_i, C) arrays -> (N, T, C) float32, NaN after each one's end; T = `steps` or the
    longest."""
    steps = steps or max(len(s) for s in sequences)
    channels = sequences[0].shape[1]
    out = np.full((len(sequences), steps, channels), np.nan, dtype=np.float32)
    for i, sequence in enumerate(sequences):
        out[i, : len(sequence)] = sequence
    return out


def sequence_lengths(x: np.ndarray) -> np.ndarray:
    """Steps before the padding of each sequence in (N, T, C)."""
    return (~np.isnan(x[..., 0])).sum(axis=1)


def unpadded(x: np.ndarray) -> list[np.ndarray]:
    """(N, T, C) padded -> N arrays (C, T_i): the layout aeon's classifiers take."""
    return [row[:length].T.astype(np.float64) for row, length in zip(x, sequence_lengths(x))]


def bundled_sets() -> dict[str, Path]:
    """Name -> folder of every UCR/UEA set aeon bundles with a _TRAIN.ts and a _TEST.ts."""
    import aeon.datasets

    root = Path(aeon.datasets.__file__).parent / "data"
    return {
        folder.name: folder
        for folder in sorted(root.iterdir())
        if (folder / f"{folder.name}_TRAIN.ts").is_file()
        and (folder / f"{folder.name}_TEST.ts").is_file()
    }


def read_ts_file(path: str | Path) -> SequenceSet:
    """One `.ts` file of the UCR/UEA archive (a header, then one series per line, channels
    separated by `:`, the class last), read by aeon's reader."""
    from aeon.datasets import load_from_ts_file

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: .ts file not found")
    try:
        series, labels = load_from_ts_file(str(path))
    except (OSError, ValueError, IndexError, TypeError) as exc:
        raise UserError(f"{path}: not a readable .ts file ({exc})") from None
    if labels is None or len(labels) == 0:
        raise UserError(f"{path}: no labeled series (the header needs @classLabel true ...)")
    sequences = [np.asarray(s, dtype=np.float64).T for s in series]  # (C, T_i) -> (T_i, C)
    for i, sequence in enumerate(sequences):
        _check_sequence(sequence, f"{path}: series {i + 1}")
    channels = sequences[0].shape[1]
    if any(s.shape[1] != channels for s in sequences):
        raise UserError(f"{path}: the series do not all have {channels} channel(s)")
    return SequenceSet(
        pad_sequences(sequences),
        [str(label) for label in labels],
        tuple(f"channel_{c}" for c in range(channels)),
    )


def read_ts_folder(root: str | Path) -> tuple[SequenceSet, SequenceSet]:
    """The archive's layout: `<name>_TRAIN.ts` and `<name>_TEST.ts` in `root`, its official
    split. Returns (train, test)."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: time-series folder not found")
    found = {}
    for split in ("TRAIN", "TEST"):
        files = sorted(root.glob(f"*_{split}.ts"))
        if len(files) != 1:
            raise UserError(
                f"{root}: expected one *_{split}.ts file (the archive's {split.lower()} split), "
                f"found {len(files)}"
            )
        found[split] = read_ts_file(files[0])
    train, test = found["TRAIN"], found["TEST"]
    if train.x.shape[2] != test.x.shape[2]:
        raise UserError(
            f"{root}: the train series have {train.x.shape[2]} channel(s), the test series "
            f"{test.x.shape[2]}"
        )
    return train, test


def read_long_csv(
    path: str | Path,
    series_column: str,
    time_column: str,
    label_column: str,
    channel_columns: tuple[str, ...],
) -> SequenceSet:
    """A CSV in long form: one row per (series, time step), the step's channel values, and
    the series' class on each of its rows. Steps are ordered by `time_column` (a number)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: CSV file not found")
    rows: dict[str, list[tuple[float, list[float]]]] = {}
    labels: dict[str, str] = {}
    with csv_rows(path) as reader:
        header = [h.strip() for h in next(reader, None) or []]
        keys = (series_column, time_column, label_column)
        for key in keys:
            if key not in header:
                raise UserError(
                    f"{path}: column {key!r} not found; columns are: {', '.join(header)}"
                )
        channels = channel_columns or tuple(h for h in header if h not in keys)
        missing = [c for c in channels if c not in header]
        if missing or not channels:
            what = f"channel column {missing[0]!r} not found" if missing else "no channels"
            raise UserError(f"{path}: {what}; columns are: {', '.join(header)}")
        at = {name: header.index(name) for name in (*keys, *channels)}
        for line_no, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise UserError(
                    f"{path}: row {line_no} has {len(row)} fields, the header has {len(header)}"
                )
            series = row[at[series_column]].strip()
            label = row[at[label_column]].strip()
            if not label:
                raise UserError(f"{path}: row {line_no}, column {label_column!r}: empty label")
            if labels.setdefault(series, label) != label:
                raise UserError(
                    f"{path}: row {line_no}: series {series!r} is labeled both "
                    f"{labels[series]!r} and {label!r}"
                )
            step = number_cell(path, line_no, time_column, row[at[time_column]])
            values = [number_cell(path, line_no, c, row[at[c]]) for c in channels]
            rows.setdefault(series, []).append((step, values))
    if not rows:
        raise UserError(f"{path}: no data rows after the header")
    sequences = []
    for series, steps in rows.items():
        times = [t for t, _ in steps]
        if len(set(times)) != len(times):
            raise UserError(f"{path}: series {series!r} has the same {time_column!r} twice")
        sequences.append(np.asarray([v for _, v in sorted(steps)], dtype=np.float64))
    return SequenceSet(pad_sequences(sequences), [labels[s] for s in rows], tuple(channels))


def _check_sequence(sequence: np.ndarray, where: str) -> None:
    if sequence.ndim != 2 or len(sequence) == 0:
        raise UserError(f"{where}: empty series")
    if not np.isfinite(sequence).all():
        raise UserError(f"{where}: missing or non-finite values (NaN, inf)")
