"""The prepared-data contract: arrays per split plus `manifest.json` describing them.

`prepare` writes it; training, evaluation and export read it through `load_prepared`,
which checks every array against the sha256 recorded in the manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.stagekit.errors import UserError

MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


def array_file(kind: str, split: str) -> str:
    """File name of the features (`x`) or labels (`y`) of a split, e.g. x_train.npy."""
    return f"{kind}_{split}.npy"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def normalization(train_x: np.ndarray, input_kind: str) -> dict[str, list[float]]:
    """Mean/std per channel (images, sequences) or per column (tables) of `train_x`: the
    training examples only, so nothing of the held-out examples reaches the model. A
    sequence's statistics cover its real steps, not the NaN padding after them."""
    if input_kind == "sequence":  # (N, T, C)
        mean = np.nanmean(train_x, axis=(0, 1), dtype=np.float64)
        std = np.nanstd(train_x, axis=(0, 1), dtype=np.float64)
    else:
        axes = (0, 2, 3) if input_kind == "image" else (0,)
        mean = train_x.mean(axis=axes, dtype=np.float64)
        std = train_x.std(axis=axes, dtype=np.float64)
    return {"mean": mean.round(8).tolist(), "std": np.maximum(std, 1e-6).round(8).tolist()}


def write_splits(
    staging: Path,
    manifest: dict[str, Any],
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    class_names: list[str] | tuple[str, ...] | None,
) -> None:
    """Save each split's (x, y) arrays into `staging` and record their size, class counts,
    sha256, shape and dtype in `manifest` ("splits", "arrays"); the caller writes it."""
    manifest["splits"], manifest["arrays"] = {}, {}
    for split, (x, y) in splits.items():
        summary: dict[str, Any] = {"size": len(y)}
        if class_names is not None:
            counts = np.bincount(y, minlength=len(class_names))
            summary["class_counts"] = dict(zip(class_names, counts.tolist()))
        manifest["splits"][split] = summary
        for kind, array in (("x", x), ("y", y)):
            name = array_file(kind, split)
            np.save(staging / name, array, allow_pickle=False)
            manifest["arrays"][name] = {
                "sha256": sha256_file(staging / name),
                "shape": list(array.shape),
                "dtype": str(array.dtype),
            }


@dataclass(frozen=True)
class PreparedData:
    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def x(self, split: str) -> np.ndarray:
        return self.arrays[array_file("x", split)]

    def y(self, split: str) -> np.ndarray:
        return self.arrays[array_file("y", split)]

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input_shape"])

    @property
    def class_names(self) -> list[str] | None:
        return self.manifest["class_names"]

    @property
    def data_hash(self) -> str:
        """One hash of the prepared data: the manifest lists every array's sha256."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()


def load_prepared(directory: str | Path, verify: bool = True) -> PreparedData:
    """Load a prepared dataset; with `verify`, each array must match its manifest sha256."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise UserError(
            f"{manifest_path}: not found; run the prepare stage first (dvc repro prepare)"
        )
    manifest = json.loads(manifest_path.read_text())
    arrays = {}
    for name, meta in manifest["arrays"].items():
        path = directory / name
        if not path.is_file():
            raise UserError(f"{path}: listed in {MANIFEST} but missing")
        if verify and sha256_file(path) != meta["sha256"]:
            raise UserError(f"{path}: sha256 differs from {MANIFEST}; re-run prepare")
        arrays[name] = np.load(path, allow_pickle=False)
    return PreparedData(manifest=manifest, arrays=arrays)
