"""Stage `evaluate`: the trained model's figures on the held-out test split.

Writes `metrics/evaluate.json`, the confusion data for `dvc plots` and its image, and logs
the figures to the training run in MLflow (plus a child run for this stage execution).
Beside the network's figures, the floor a linear model from scikit-learn reaches on the same
splits (`sklearn_*`): a network that does not clear it is not worth its training.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from pipelines.stagekit import tracking
from pipelines.stagekit.atomic import write_json
from pipelines.stagekit.dataset import PreparedData, load_prepared
from pipelines.stagekit.metrics import (
    accuracy_figures,
    classification_metrics,
    headline,
    regression_metrics,
    small_split_warnings,
)
from pipelines.stagekit.model_bundle import MODEL_FILE, inference_model, load_trained
from pipelines.stagekit.plots import confusion_matrix_png, predicted_vs_actual_png, write_csv
from pipelines.stagekit.stage import stage_command

log = logging.getLogger(__name__)

STAGE = "evaluate"
PREDICTIONS_CSV = "predictions.csv"  # actual vs predicted per test example, for `dvc plots`
PREDICTIONS_PNG = "test_predictions.png"  # confusion matrix, or predicted vs actual
BASELINE_ROWS = 20_000
"""The scikit-learn baseline fits on at most this many training examples (a seeded sample):
on a large image set a linear model would take minutes, and its figure is a floor, not a
contender."""


def linear_baseline(data: PreparedData) -> dict[str, float]:
    """Logistic regression (classification) or ridge regression on the standardized,
    flattened inputs of the training (or labeled) split, scored on the test split; {} for sequences
    (train_timeseries compares those with aeon's baselines)."""
    if data.manifest["input_kind"] == "sequence":
        return {}
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def flat(split: str) -> np.ndarray:
        x = data.x(split)
        return x.reshape(len(x), -1)

    # The pseudo-label stage's data has no train split: its labeled examples are the ones
    # a model without the unlabeled pool could learn from.
    fit_on = "train" if "train" in data.manifest["splits"] else "labeled"
    x_train, y_train = flat(fit_on), data.y(fit_on)
    if len(x_train) > BASELINE_ROWS:  # a seeded sample: a split may be ordered by class
        keep = np.random.default_rng(0).choice(len(x_train), BASELINE_ROWS, replace=False)
        x_train, y_train = x_train[keep], y_train[keep]
    y_test = data.y("test")
    if data.task == "classification":
        if len(np.unique(y_train)) < 2:
            return {}  # one class: nothing for a classifier to learn
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        predicted = model.fit(x_train, y_train).predict(flat("test"))
        return accuracy_figures(
            "sklearn_test_accuracy", int((predicted == y_test).sum()), len(y_test)
        )
    model = make_pipeline(StandardScaler(), Ridge())
    error = model.fit(x_train, y_train).predict(flat("test")) - y_test
    return {"sklearn_test_rmse": float(np.sqrt(np.mean(error**2)))}


def evaluate(
    experiment: str,
    data_dir: str = "data/prepared/supervised",
    model_dir: str = "artifacts/supervised/model",
    metrics_path: str = "metrics/evaluate.json",
    plots_dir: str = "plots/supervised",
) -> dict:
    """The trained model's test-split figures; `experiment` is the MLflow experiment of the
    training run (dvc.yaml passes `tracking.experiment`, or the pseudo-label one). Reads no
    params itself: the same code evaluates the supervised and the pseudo-label models."""
    data = load_prepared(data_dir)
    model, _ = load_trained(model_dir, data.manifest)
    with torch.no_grad():
        output = inference_model(model, data.task)(torch.from_numpy(data.x("test"))).numpy()
    y_test = data.y("test")
    plots = Path(plots_dir)
    image = plots / PREDICTIONS_PNG
    if data.task == "classification":
        metrics, matrix = classification_metrics(y_test, output, data.class_names)
        names = data.class_names
        rows = [
            {"actual": names[a], "predicted": names[p]}
            for a, p in zip(y_test, output.argmax(axis=1))
        ]
        confusion_matrix_png(matrix, names, image)
    else:
        metrics = regression_metrics(y_test, output)
        predicted = output.reshape(-1)
        rows = [{"actual": float(a), "predicted": float(p)} for a, p in zip(y_test, predicted)]
        predicted_vs_actual_png(y_test, predicted, image)
    write_csv(plots / PREDICTIONS_CSV, rows, ("actual", "predicted"))
    metrics.update(linear_baseline(data))
    warnings = small_split_warnings(data.manifest["splits"], data.manifest["input_kind"])
    for warning in warnings:
        log.warning(warning)
    images = [image]

    tags = tracking.stage_tags(STAGE, data.data_hash)
    train_run_id = tracking.producing_run(Path(model_dir) / MODEL_FILE, experiment)
    with tracking.stage_run(experiment, STAGE, tags, parent_run_id=train_run_id) as run:
        run.log_metrics(metrics)
        for image in images:
            run.log_artifact(image, "plots")
        write_json(metrics_path, {**metrics, "warnings": warnings, tracking.RUN_ID_KEY: run.run_id})
    if train_run_id is not None:
        # The training run is the model's record: it carries the test figures too.
        training_run = tracking.run_logger(train_run_id)
        training_run.log_metrics(metrics)
        for image in images:
            training_run.log_artifact(image, "plots")
    log.info("test split (%d examples): %s", len(y_test), headline(metrics))
    return metrics


if __name__ == "__main__":
    stage_command(evaluate, name=STAGE)
