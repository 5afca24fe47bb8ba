"""Stage `prepare`: raw data -> stratified train/val/test arrays + manifest.json.

Reads an image folder, a CSV or MNIST-format IDX files (params `prepare.*`), splits it
with a seed, computes the normalization statistics on the training split only, and writes
everything atomically.
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
from pipelines.stagekit.readers import (
    RawDataset,
    read_csv_table,
    read_idx_folder,
    read_image_folder,
)
from pipelines.stagekit.stage import stage_command
from pipelines.supervised.config import PrepareConfig

log = logging.getLogger(__name__)

MIN_EXAMPLES_PER_CLASS = 3  # one each for train, val and test


def read_raw(config: PrepareConfig, source: str) -> RawDataset:
    if config.format == "image_folder":
        return read_image_folder(source, config.image_size, config.grayscale)
    if config.format == "idx":
        return read_idx_folder(source, config.image_size, config.grayscale)
    return read_csv_table(source, config.label_column, config.feature_columns, config.task)


def split_indices(raw: RawDataset, config: PrepareConfig) -> dict[str, np.ndarray]:
    """Seeded split; classification keeps every class's share equal across the splits."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(raw.labels))
    stratify = None
    if raw.class_names is not None:
        counts = np.bincount(raw.labels, minlength=len(raw.class_names))
        for name, count in zip(raw.class_names, counts):
            if count < MIN_EXAMPLES_PER_CLASS:
                raise UserError(
                    f"class {name!r} has {count} example(s); each class needs at least "
                    f"{MIN_EXAMPLES_PER_CLASS} (train, val and test)"
                )
        stratify = raw.labels
    try:
        rest, test = train_test_split(
            indices, test_size=config.test_fraction, random_state=config.seed, stratify=stratify
        )
        val_share = config.val_fraction / (1.0 - config.test_fraction)
        train, val = train_test_split(
            rest,
            test_size=val_share,
            random_state=config.seed,
            stratify=None if stratify is None else stratify[rest],
        )
    except ValueError as exc:  # e.g. a split too small to hold every class
        raise UserError(f"cannot split {len(indices)} examples: {exc}") from None
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def prepare(
    config: Annotated[PrepareConfig, Param("prepare")],
    source: str | None = None,
    output: str = "data/prepared/supervised",
) -> dict:
    """Read the raw data at `source` (default: prepare.source) and write it prepared."""
    source = source or config.source
    return write_prepared(read_raw(config, source), config, source, output)


def write_prepared(raw: RawDataset, config: PrepareConfig, source: str, output: str) -> dict:
    """Split `raw` (read from `source`) and write it to `output`; returns the manifest."""
    splits = split_indices(raw, config)
    manifest: dict = {
        "format_version": 1,
        "task": config.task,
        "input_kind": raw.input_kind,
        "input_shape": list(raw.features.shape[1:]),
        "class_names": list(raw.class_names) if raw.class_names is not None else None,
        "feature_names": list(raw.feature_names) if raw.feature_names is not None else None,
        "preprocessing": {
            "image_size": list(config.image_size),
            "grayscale": config.grayscale,
            "pixel_scale": "pixels / 255, in [0, 1]",
        }
        if raw.input_kind == "image"
        else {"columns": list(raw.feature_names or ())},
        "normalization": normalization(raw.features[splits["train"]], raw.input_kind),
        "source": {"path": str(source), "format": config.format, "seed": config.seed},
    }
    with output_directory(output) as staging:
        write_splits(
            staging,
            manifest,
            {split: (raw.features[idx], raw.labels[idx]) for split, idx in splits.items()},
            raw.class_names,
        )
        write_json(staging / MANIFEST, manifest)
    sizes = ", ".join(f"{s}={manifest['splits'][s]['size']}" for s in SPLITS)
    log.info("prepared %s -> %s (%s)", source, output, sizes)
    for warning in small_split_warnings(manifest["splits"]):
        log.warning(warning)
    return manifest


if __name__ == "__main__":
    stage_command(prepare)
