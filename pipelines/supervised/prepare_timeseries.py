"""Stage `prepare_timeseries`: time series -> train/val/test arrays + manifest.json.

Reads the UCR/UEA archive's `.ts` files (their official train/test split) or a long-form
CSV (split here, stratified, with `timeseries.seed`), holds out `timeseries.val_fraction`
of the training series for validation, and writes the prepared-data layout every
supervised stage reads: x arrays (N, T, C), each series NaN-padded to the longest length T
(pipelines/stagekit/sequences.py), the normalization statistics of the training split.
"""

from __future__ import annotations

import logging
from typing import Annotated

import numpy as np

from pipelines.stagekit.atomic import output_directory, write_json
from pipelines.stagekit.config import Param
from pipelines.stagekit.dataset import MANIFEST, SPLITS, normalization, write_splits
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.metrics import small_split_warnings
from pipelines.stagekit.readers import natural_key
from pipelines.stagekit.sequences import (
    SequenceSet,
    pad_sequences,
    read_long_csv,
    read_ts_folder,
    sequence_lengths,
)
from pipelines.stagekit.stage import stage_command
from pipelines.supervised.timeseries_config import TimeseriesConfig

log = logging.getLogger(__name__)

READS = (
    "source",
    "format",
    "series_column",
    "time_column",
    "label_column",
    "channel_columns",
    "val_fraction",
    "test_fraction",
    "max_length",
    "seed",
)


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) indices, every class in both when it can be."""
    from sklearn.model_selection import train_test_split

    counts = np.bincount(labels)
    if counts[counts > 0].min() < 2:
        raise UserError(f"a class has a single series: it cannot be in both {what}")
    try:
        kept, held = train_test_split(
            np.arange(len(labels)), test_size=fraction, random_state=seed, stratify=labels
        )
    except ValueError as exc:
        raise UserError(f"cannot split {len(labels)} series into {what}: {exc}") from None
    return np.sort(kept), np.sort(held)


def class_indices(sets: list[SequenceSet]) -> tuple[list[str], list[np.ndarray]]:
    """Sorted class names over all sets, and each set's labels as indices into them."""
    names = sorted({label for s in sets for label in s.labels}, key=natural_key)
    if len(names) < 2:
        raise UserError("the series have a single class; need at least 2")
    index = {name: i for i, name in enumerate(names)}
    return names, [np.asarray([index[v] for v in s.labels], dtype=np.int64) for s in sets]


def prepare_timeseries(
    config: Annotated[TimeseriesConfig, Param("timeseries", reads=READS)],
    output: str = "data/prepared/timeseries",
) -> dict:
    """Read `timeseries.source` and write it prepared to `output`; returns the manifest."""
    if config.format == "ts":
        train, test = read_ts_folder(config.source)
        names, (y_train, y_test) = class_indices([train, test])
        unseen = set(y_test) - set(y_train)
        if unseen:
            raise UserError(
                f"{config.source}: test classes {[names[i] for i in sorted(unseen)]} never "
                "occur in the training file"
            )
        x_train, x_test = train.x, test.x
        channels = train.channel_names
    else:
        every = read_long_csv(
            config.source,
            config.series_column,
            config.time_column,
            config.label_column,
            config.channel_columns,
        )
        names, (labels,) = class_indices([every])
        rest, held = stratified_split(labels, config.test_fraction, config.seed, "train and test")
        x_train, y_train, x_test, y_test = every.x[rest], labels[rest], every.x[held], labels[held]
        channels = every.channel_names
    steps = max(x_train.shape[1], x_test.shape[1])
    if steps > config.max_length:
        raise UserError(
            f"{config.source}: a series has {steps} steps, more than timeseries.max_length "
            f"{config.max_length}"
        )
    # One common length T, so every split is an (N, T, C) array of the same shape.
    x_train, x_test = (pad_sequences(list(x), steps) for x in (x_train, x_test))
    keep, val = stratified_split(y_train, config.val_fraction, config.seed, "train and val")
    splits = {
        "train": (x_train[keep], y_train[keep]),
        "val": (x_train[val], y_train[val]),
        "test": (x_test, y_test),
    }
    lengths = sequence_lengths(np.concatenate([x_train, x_test]))
    manifest: dict = {
        "format_version": 1,
        "task": "classification",
        "input_kind": "sequence",
        "input_shape": [steps, len(channels)],
        "class_names": names,
        "feature_names": list(channels),
        "preprocessing": {
            "channels": list(channels),
            "lengths": {"min": int(lengths.min()), "max": int(lengths.max())},
            "max_length": config.max_length,
            "padding": "NaN after each series' last step, to the longest length",
        },
        "normalization": normalization(splits["train"][0], "sequence"),
        "source": {"path": str(config.source), "format": config.format, "seed": config.seed},
    }
    with output_directory(output) as staging:
        write_splits(staging, manifest, splits, names)
        write_json(staging / MANIFEST, manifest)
    sizes = ", ".join(f"{s}={manifest['splits'][s]['size']}" for s in SPLITS)
    log.info(
        "prepared %s -> %s (%s; %d channel(s), %d-%d steps)",
        config.source,
        output,
        sizes,
        len(channels),
        lengths.min(),
        lengths.max(),
    )
    for warning in small_split_warnings(manifest["splits"], "sequence"):
        log.warning(warning)
    return manifest


if __name__ == "__main__":
    stage_command(prepare_timeseries)
