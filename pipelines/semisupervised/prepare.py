"""Stage `prepare_pseudolabel`: the labeled / unlabeled split for semi-supervised training.

From the prepared supervised data (its validation and test splits are reused unchanged):
- by default, keep `pseudolabel.labeled_fraction` (or `labeled_per_class`) of each class's
  training examples labeled and put the rest in the unlabeled pool, their true labels
  stored apart (`y_unlabeled.npy`) for evaluating pseudo-labels, never for training;
- with `pseudolabel.unlabeled_source`, keep every training label and read the user's
  unlabeled images or CSV rows, preprocessed like the labeled data.
"""

from __future__ import annotations

import copy
import logging
from typing import Annotated

import numpy as np

from pipelines.semisupervised.config import PseudoLabelConfig
from pipelines.stagekit.atomic import output_directory, write_json
from pipelines.stagekit.config import Param
from pipelines.stagekit.dataset import MANIFEST, PreparedData, load_prepared, sha256_file
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.readers import read_unlabeled_csv, read_unlabeled_images
from pipelines.stagekit.stage import stage_command

log = logging.getLogger(__name__)

STAGE = "prepare_pseudolabel"
# What this stage reads of the `pseudolabel` section (the rest is train_pseudolabel's).
SPLIT_KEYS = ("labeled_fraction", "labeled_per_class", "unlabeled_source", "split_seed")


def keep_labels(
    labels: np.ndarray, class_names: list[str], fraction: float, per_class: int, seed: int
) -> np.ndarray:
    """Sorted indices of the examples that keep their label: the same share of every class."""
    rng = np.random.default_rng(seed)
    kept = []
    for cls, name in enumerate(class_names):
        members = np.flatnonzero(labels == cls)
        count = per_class if per_class > 0 else round(fraction * len(members))
        if count < 1:
            raise UserError(
                f"class {name!r} keeps no labeled example ({len(members)} training examples, "
                f"pseudolabel.labeled_fraction {fraction:g}); raise it or set labeled_per_class"
            )
        if count >= len(members):
            raise UserError(
                f"class {name!r} has {len(members)} training examples: keeping {count} labels "
                "leaves none unlabeled; lower pseudolabel.labeled_per_class"
            )
        kept.append(rng.choice(members, size=count, replace=False))
    return np.sort(np.concatenate(kept))


def read_user_unlabeled(source: str, manifest: dict) -> np.ndarray:
    if manifest["input_kind"] == "image":
        prep = manifest["preprocessing"]
        return read_unlabeled_images(source, tuple(prep["image_size"]), prep["grayscale"])
    return read_unlabeled_csv(source, tuple(manifest["feature_names"]))


def prepare_pseudolabel(
    pseudolabel: Annotated[PseudoLabelConfig, Param("pseudolabel", reads=SPLIT_KEYS)],
    data_dir: str = "data/prepared/supervised",
    output: str = "data/prepared/pseudolabel",
) -> dict:
    data = load_prepared(data_dir)
    if data.task != "classification":
        raise UserError("pseudo-labeling needs a classification task (prepare.task)")
    x_train, y_train = data.x("train"), data.y("train")
    arrays: dict[str, np.ndarray] = {}
    source = pseudolabel.unlabeled_source
    if source:
        arrays["x_labeled"], arrays["y_labeled"] = x_train, y_train
        arrays["x_unlabeled"] = read_user_unlabeled(source, data.manifest)
        mode = f"labeled: all of {data.manifest['source']['path']}; unlabeled: {source}"
    else:
        kept = keep_labels(
            y_train,
            data.class_names,
            pseudolabel.labeled_fraction,
            pseudolabel.labeled_per_class,
            pseudolabel.split_seed,
        )
        pool = np.setdiff1d(np.arange(len(y_train)), kept)
        arrays["x_labeled"], arrays["y_labeled"] = x_train[kept], y_train[kept]
        arrays["x_unlabeled"], arrays["y_unlabeled"] = x_train[pool], y_train[pool]
        mode = "labels kept from the prepared training split; the rest held aside"
    if len(arrays["x_unlabeled"]) == 0:
        raise UserError("no unlabeled data: nothing to pseudo-label")
    for split in ("val", "test"):  # reused unchanged: comparable with the supervised figures
        arrays[f"x_{split}"], arrays[f"y_{split}"] = data.x(split), data.y(split)
    manifest = build_manifest(data, arrays, mode)
    with output_directory(output) as staging:
        for name, array in arrays.items():
            np.save(staging / f"{name}.npy", array, allow_pickle=False)
            manifest["arrays"][f"{name}.npy"] = {
                "sha256": sha256_file(staging / f"{name}.npy"),
                "shape": list(array.shape),
                "dtype": str(array.dtype),
            }
        write_json(staging / MANIFEST, manifest)
    info = manifest["semi_supervised"]
    log.info(
        "%d labeled (%s per class), %d unlabeled -> %s",
        info["labeled"],
        min(info["labeled_per_class"].values()),
        info["unlabeled"],
        output,
    )
    return manifest


def build_manifest(data: PreparedData, arrays: dict[str, np.ndarray], mode: str) -> dict:
    manifest = copy.deepcopy(data.manifest)
    counts = np.bincount(arrays["y_labeled"], minlength=len(data.class_names))
    manifest["arrays"] = {}
    manifest["splits"] = {
        "labeled": {"size": len(arrays["y_labeled"])},
        "unlabeled": {"size": len(arrays["x_unlabeled"])},
        "val": data.manifest["splits"]["val"],
        "test": data.manifest["splits"]["test"],
    }
    manifest["semi_supervised"] = {
        "mode": mode,
        "labeled": int(len(arrays["y_labeled"])),
        "unlabeled": int(len(arrays["x_unlabeled"])),
        "labeled_per_class": dict(zip(data.class_names, counts.tolist())),
        "unlabeled_truth_known": "y_unlabeled" in arrays,
        "derived_from": data.data_hash,
    }
    return manifest


if __name__ == "__main__":
    stage_command(prepare_pseudolabel, name=STAGE)
