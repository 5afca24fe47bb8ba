"""A CSV regression task through the same stages: prepare -> train -> evaluate -> export."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.architecture import ArchitectureConfig
from pipelines.stagekit.config import ExportConfig
from pipelines.supervised.config import PrepareConfig, TrackingConfig
from pipelines.supervised.evaluate import evaluate
from pipelines.supervised.export import export
from pipelines.supervised.prepare import prepare
from pipelines.supervised.train import train_supervised
from tests.helpers import write_csv
from tests.integration.conftest import quick_train_config

pytestmark = pytest.mark.integration


def test_csv_regression_runs_through_every_stage(ray_cluster, tmp_path, stores):
    stores()
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=400), rng.normal(size=400)
    rows = [[x1, x2, 2 * x1 - x2 + rng.normal(0, 0.1)] for x1, x2 in zip(a, b)]
    source = write_csv(tmp_path / "houses.csv", ["size", "age", "price"], rows)
    prepare_config = PrepareConfig(
        source=str(source), format="csv", task="regression", label_column="price"
    )
    model = ArchitectureConfig(kind="mlp", hidden_sizes=(32,), dropout=0.0)
    train = quick_train_config(epochs=8, num_workers=1, loss="mse", lr=0.01)
    experiment = TrackingConfig().experiment
    out = tmp_path
    prepare(prepare_config, str(source), str(out / "prepared"))
    summary = train_supervised(
        model,
        train,
        TrackingConfig(),
        data_dir=str(out / "prepared"),
        output=str(out / "model"),
        metrics_path=str(out / "t.json"),
        plots_dir=str(out / "plots"),
    )
    metrics = evaluate(
        experiment,
        str(out / "prepared"),
        str(out / "model"),
        str(out / "evaluate.json"),
        str(out / "plots"),
    )
    assert summary["epochs_run"] == 8  # a one-worker Train run, every epoch reported
    assert metrics["test_r2"] > 0.8  # y = 2a - b is easy for an MLP
    figures = export(
        ExportConfig(),
        "dlpipe-regressor",
        experiment,
        str(out / "prepared"),
        str(out / "model"),
        str(out / "evaluate.json"),
        str(out / "export"),
        str(out / "figures.json"),
    )
    assert figures["onnx_max_abs_diff"] <= 1e-4 and "test_rmse" in figures
    assert (out / "plots" / "predictions.csv").read_text().startswith("actual,predicted")
    card = json.loads((out / "export" / "model_card.json").read_text())
    assert card["task"] == "regression" and card["input"]["feature_names"] == ["size", "age"]
