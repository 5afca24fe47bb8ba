"""Stage `evaluate`: the trained model's figures on the held-out test split.

Writes `metrics/evaluate.json`, the confusion data for `dvc plots` and its image, and logs
the figures to the training run in MLflow (plus a child run for this stage execution).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from pipelines import tracking
from pipelines.atomic import write_json
from pipelines.config import load_config
from pipelines.dataset import load_prepared
from pipelines.metrics import classification_metrics, regression_metrics
from pipelines.model_bundle import inference_model, load_bundle
from pipelines.plots import confusion_matrix_png, write_csv
from pipelines.stage import run_stage
from pipelines.train_supervised import RUN_FILE

log = logging.getLogger(__name__)

STAGE = "evaluate"


def evaluate(
    experiment: str, data_dir: str, model_dir: str, metrics_path: str, plots_dir: str
) -> dict:
    data = load_prepared(data_dir)
    model, _ = load_bundle(model_dir)
    with torch.no_grad():
        output = inference_model(model, data.task)(torch.from_numpy(data.x("test"))).numpy()
    y_test = data.y("test")
    plots = Path(plots_dir)
    images: list[Path] = []
    if data.task == "classification":
        metrics, matrix = classification_metrics(y_test, output, data.class_names)
        names = data.class_names
        rows = [
            {"actual": names[a], "predicted": names[p]}
            for a, p in zip(y_test, output.argmax(axis=1))
        ]
        write_csv(plots / "confusion.csv", rows, ("actual", "predicted"))
        confusion_matrix_png(matrix, names, plots / "confusion_matrix.png")
        images.append(plots / "confusion_matrix.png")
    else:
        metrics = regression_metrics(y_test, output)
    write_json(metrics_path, metrics)

    train_run_id = json.loads((Path(model_dir) / RUN_FILE).read_text())["mlflow_run_id"]
    tags = tracking.stage_tags(STAGE, data.data_hash)
    with tracking.stage_run(experiment, STAGE, tags, parent_run_id=train_run_id) as run:
        run.log_metrics(metrics)
        for image in images:
            run.log_artifact(image, "plots")
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
    args = parser.parse_args(argv)
    run_stage(
        STAGE,
        lambda: evaluate(
            load_config(args.params).tracking.experiment,
            args.data,
            args.model,
            args.metrics,
            args.plots,
        ),
    )


if __name__ == "__main__":
    main()
