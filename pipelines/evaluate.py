"""Stage `evaluate`: the trained model's figures on the held-out test split.

Writes `metrics/evaluate.json`, the confusion data for `dvc plots` and its image, and logs
the figures to the training run in MLflow (plus a child run for this stage execution).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from pipelines import tracking
from pipelines.atomic import write_json
from pipelines.config import load_config
from pipelines.dataset import load_prepared
from pipelines.metrics import classification_metrics, regression_metrics
from pipelines.model_bundle import MODEL_FILE, inference_model, load_trained
from pipelines.plots import confusion_matrix_png, predicted_vs_actual_png, write_csv
from pipelines.stage import run_stage

log = logging.getLogger(__name__)

STAGE = "evaluate"
PREDICTIONS_CSV = "predictions.csv"  # actual vs predicted per test example, for `dvc plots`
PREDICTIONS_PNG = "test_predictions.png"  # confusion matrix, or predicted vs actual


def evaluate(
    experiment: str, data_dir: str, model_dir: str, metrics_path: str, plots_dir: str
) -> dict:
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
    write_json(metrics_path, metrics)
    images = [image]

    tags = tracking.stage_tags(STAGE, data.data_hash)
    train_run_id = tracking.producing_run(Path(model_dir) / MODEL_FILE, experiment)
    with tracking.stage_run(experiment, STAGE, tags, parent_run_id=train_run_id) as run:
        run.log_metrics(metrics)
        for image in images:
            run.log_artifact(image, "plots")
    if train_run_id is not None:
        # The training run is the model's record: it carries the test figures too.
        training_run = tracking.RunLogger(train_run_id, tracking.tracking_uri())
        training_run.log_metrics(metrics)
        for image in images:
            training_run.log_artifact(image, "plots")
    headline = {k: round(v, 4) for k, v in metrics.items() if "/" not in k}
    log.info("test split (%d examples): %s", len(y_test), headline)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared/supervised")
    parser.add_argument("--model", default="artifacts/supervised/model")
    parser.add_argument("--metrics", default="metrics/evaluate.json")
    parser.add_argument("--plots", default="plots/supervised")
    parser.add_argument("--experiment", help="MLflow experiment (default: tracking.experiment)")
    args = parser.parse_args(argv)
    run_stage(
        STAGE,
        lambda: evaluate(
            args.experiment or load_config(args.params).tracking.experiment,
            args.data,
            args.model,
            args.metrics,
            args.plots,
        ),
    )


if __name__ == "__main__":
    main()
