"""Stage `cross_validate`: k-fold figures for small labeled sets (params `evaluate.folds`).

A test split of a few dozen examples gives a rough figure: its 95% interval spans tens of
points, and a different split seed can move it by as much. With `evaluate.folds: k` this
stage pools every labeled example (train, val and test), cuts them into k folds (stratified
for classification), and trains k fresh models with the `model` and `train` settings of
`train_supervised`, each on the Ray Train workers: model i is tested on fold i, and early
stops on a validation share carved from the other folds (the same share `prepare` gave val),
so no example it is scored on shaped it. Every example is then tested exactly once.

Writes `metrics/cross_validation.json`: the figures' mean, standard deviation, min and max
over the folds, each fold's own, and the pooled figures over all out-of-fold predictions
(with their 95% intervals over every example). Each fold is a child MLflow run of the
stage's run. With the default `folds: 0` it trains nothing and says how to turn it on.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Annotated

import numpy as np
import torch

from models.architecture import ArchitectureConfig
from pipelines.stagekit import tracking
from pipelines.stagekit.atomic import write_json
from pipelines.stagekit.config import Param, TrainConfig, config_to_dict, overlay_sections
from pipelines.stagekit.dataset import SPLITS, PreparedData, load_prepared, normalization
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.metrics import classification_metrics, headline, regression_metrics
from pipelines.stagekit.model_bundle import build_model, check_compatible, inference_model
from pipelines.stagekit.stage import stage_command
from pipelines.supervised.config import EvaluateConfig, TrackingConfig
from pipelines.training.driver import run_name, supervised_task, train_job
from pipelines.training.fitting import EVAL_BATCH_SIZE

log = logging.getLogger(__name__)

STAGE = "cross_validate"


@dataclasses.dataclass(frozen=True)
class Fold:
    """Indices into the pooled examples."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def fold_indices(
    labels: np.ndarray, folds: int, val_share: float, seed: int, stratified: bool
) -> list[Fold]:
    """`folds` folds over the examples whose labels are `labels`: fold i's test part is the
    i-th k-th of them; `val_share` of the rest is its validation part, the remainder its
    training part. Stratified folds keep each class's share in every part."""
    from sklearn.model_selection import KFold, StratifiedKFold, train_test_split

    splitter = (
        StratifiedKFold(folds, shuffle=True, random_state=seed)
        if stratified
        else KFold(folds, shuffle=True, random_state=seed)
    )
    result = []
    for rest, test in splitter.split(np.zeros(len(labels)), labels):
        train, val = train_test_split(
            rest,
            test_size=val_share,
            random_state=seed,
            stratify=labels[rest] if stratified else None,
        )
        result.append(Fold(np.sort(train), np.sort(val), np.sort(test)))
    return result


def check_folds(data: PreparedData, folds: int) -> None:
    """A clear error before any training when the classes are too small for `folds` folds
    (each needs one example per fold's test part, and a few left to train on)."""
    counts = {}
    for split in SPLITS:
        for name, count in (data.manifest["splits"][split].get("class_counts") or {}).items():
            counts[name] = counts.get(name, 0) + count
    # One per test fold, plus one for validation and one for training in every fold.
    needed = folds + 2
    small = {name: count for name, count in counts.items() if count < needed}
    if small:
        listed = ", ".join(f"{name!r} {count}" for name, count in small.items())
        raise UserError(
            f"evaluate.folds: {folds} folds need at least {needed} examples per class; "
            f"{listed}: lower evaluate.folds or label more examples"
        )


def predict(network: torch.nn.Module, task: str, x: np.ndarray) -> np.ndarray:
    """The model's outputs (class probabilities, or values) on `x`, in chunks."""
    model = inference_model(network, task)
    inputs = torch.from_numpy(x)
    with torch.no_grad():
        return torch.cat(
            [model(inputs[i : i + EVAL_BATCH_SIZE]) for i in range(0, len(x), EVAL_BATCH_SIZE)]
        ).numpy()


def predict_shape(data: PreparedData) -> tuple[int, ...]:
    """One example's output: a probability per class, or one value."""
    return (len(data.class_names),) if data.task == "classification" else (1,)


def scores(data: PreparedData, y: np.ndarray, output: np.ndarray) -> dict[str, float]:
    """The overall test figures of `output` against `y` (per-class ones are evaluate's)."""
    if data.task == "classification":
        figures, _ = classification_metrics(y, output, data.class_names)
        return {k: v for k, v in figures.items() if "/" not in k}
    return regression_metrics(y, output)


def spread(per_fold: list[dict[str, float]]) -> dict[str, float]:
    """Mean, standard deviation (over folds, ddof=1), min and max of each headline figure."""
    summary = {}
    for key in per_fold[0]:
        if key.endswith(("_ci95_low", "_ci95_high", "_examples")):
            continue  # a fold's interval is the pooled figures' business
        values = np.array([fold[key] for fold in per_fold])
        summary[f"{key}_mean"] = float(values.mean())
        summary[f"{key}_std"] = float(values.std(ddof=1))
        summary[f"{key}_min"] = float(values.min())
        summary[f"{key}_max"] = float(values.max())
    return summary


def cross_validate(
    evaluate: Annotated[EvaluateConfig, Param("evaluate")],
    model: Annotated[ArchitectureConfig, Param("model")],
    train: Annotated[TrainConfig, Param("train")],
    tracking_config: Annotated[TrackingConfig, Param("tracking")],
    tuned_params: Annotated[str, Param("tuned_params")] = "pipelines/tuning/untuned.yaml",
    data_dir: str = "data/prepared/supervised",
    metrics_path: str = "metrics/cross_validation.json",
) -> dict:
    """Train and test `evaluate.folds` models on the pooled labeled examples (see the module
    docstring); with `folds: 0`, only write that it is off."""
    if evaluate.folds == 0:
        log.info("off (evaluate.folds: 0); set evaluate.folds: 5 for 5-fold figures")
        summary: dict = {"folds": 0}
        write_json(metrics_path, summary)
        return summary
    tuned = overlay_sections(tuned_params, {"model": model, "train": train})
    model, train = tuned["model"], tuned["train"]
    data = load_prepared(data_dir)
    check_compatible(model, train, data.manifest)
    stratified = data.task == "classification"
    if stratified:
        check_folds(data, evaluate.folds)
    x = np.concatenate([data.x(split) for split in SPLITS])
    y = np.concatenate([data.y(split) for split in SPLITS])
    sizes = {split: data.manifest["splits"][split]["size"] for split in SPLITS}
    val_share = sizes["val"] / (sizes["train"] + sizes["val"])  # prepare's validation share
    folds = fold_indices(y, evaluate.folds, val_share, evaluate.seed, stratified)

    tags = tracking.stage_tags(STAGE, data.data_hash)
    out_of_fold = np.zeros((len(y), *predict_shape(data)), dtype=np.float32)
    per_fold = []
    with tracking.stage_run(tracking_config.experiment, STAGE, tags) as parent:
        parent.log_params(
            {
                "evaluate": config_to_dict(evaluate),
                "model": config_to_dict(model),
                "train": config_to_dict(train),
                "examples": len(y),
            }
        )
        for i, fold in enumerate(folds):
            # The fold's own normalization: its training examples only, as prepare does.
            manifest = {
                **data.manifest,
                "normalization": normalization(x[fold.train], data.manifest["input_kind"]),
            }
            arrays = {
                "x_train": x[fold.train],
                "y_train": y[fold.train],
                "x_val": x[fold.val],
                "y_val": y[fold.val],
            }
            label = f"fold-{i + 1}-of-{len(folds)}"
            name = run_name(
                f"{STAGE}-{label}",
                config_to_dict(model),
                config_to_dict(train),
                config_to_dict(evaluate),
                data.data_hash,
            )
            log.info(
                "%s: training on %d examples (%d for early stopping), testing on %d",
                label,
                len(fold.train),
                len(fold.val),
                len(fold.test),
            )
            fold_tags = {**tags, "fold": str(i + 1)}
            with tracking.stage_run(
                tracking_config.experiment, label, fold_tags, parent_run_id=parent.run_id
            ) as run:
                state = train_job(
                    arrays, supervised_task(model, manifest, train), train, name, run
                ).state
                if state["best_model"] is None:
                    raise UserError(
                        f"{label}: no usable epoch, validation loss never finite "
                        f"(train.lr {train.lr:g})"
                    )
                network = build_model(model, manifest)
                network.load_state_dict(state["best_model"])
                output = predict(network, data.task, x[fold.test])
                figures = scores(data, y[fold.test], output)
                run.log_metrics(figures)
            out_of_fold[fold.test] = output
            per_fold.append(figures)
            log.info("%s: %s", label, headline(figures))

        pooled = scores(data, y, out_of_fold)
        summary = {
            "folds": len(folds),
            "examples": len(y),
            **spread(per_fold),
            **{f"pooled_{k}": v for k, v in pooled.items()},
            "per_fold": {f"fold_{i + 1}": figures for i, figures in enumerate(per_fold)},
        }
        parent.log_metrics({k: v for k, v in summary.items() if not isinstance(v, dict)})
        write_json(metrics_path, {**summary, tracking.RUN_ID_KEY: parent.run_id})
    key = "test_accuracy" if stratified else "test_rmse"
    log.info(
        "%d folds over %d examples: %s %.4f +- %.4f (min %.4f, max %.4f); pooled: %s",
        len(folds),
        len(y),
        key,
        summary[f"{key}_mean"],
        summary[f"{key}_std"],
        summary[f"{key}_min"],
        summary[f"{key}_max"],
        headline(pooled),
    )
    return summary


if __name__ == "__main__":
    stage_command(cross_validate, name=STAGE)
