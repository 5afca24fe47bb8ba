"""Ray Train on a real local cluster, tracked in a real MLflow store."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from models.architecture import ArchitectureConfig
from pipelines.stagekit import tracking
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.model_bundle import MODEL_FILE
from pipelines.supervised.config import EvaluateConfig, TrackingConfig
from pipelines.supervised.cross_validate import cross_validate
from pipelines.supervised.train import train_supervised
from tests.integration.conftest import quick_train_config

pytestmark = pytest.mark.integration


def training_run_id(trained) -> str:
    """The MLflow run that wrote the trained model file (found by the file's hash)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", trained.mlflow_uri)
        run_id = tracking.producing_run(trained.model_dir / MODEL_FILE, trained.tracking.experiment)
    assert run_id is not None
    return run_id


def test_two_workers_learn_the_digits(trained):
    assert not (trained.model_dir / "run.json").exists()  # run ids stay out of DVC's outputs
    assert trained.summary["best_val_accuracy"] > 0.9
    figures = json.loads((trained.metrics / "supervised.json").read_text())
    assert figures["test_accuracy"] > 0.9 and figures["test_macro_f1"] > 0.9
    assert figures["onnx_max_abs_diff"] <= 1e-4
    curve = (trained.root / "plots" / "learning_curves.csv").read_text().splitlines()
    assert curve[0].startswith("epoch,train_loss,val_loss")
    first, last = (line.split(",") for line in (curve[1], curve[-1]))
    assert float(last[1]) < float(first[1])  # the training loss fell


def test_mlflow_shows_params_curves_images_and_the_registered_model(trained):
    client = MlflowClient(trained.mlflow_uri)
    run_id = training_run_id(trained)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.optimizer"] == "adam" and run.data.params["model.kind"] == "cnn"
    assert {"git_commit", "dvc_stage", "data_sha256"} <= set(run.data.tags)
    assert run.data.tags["dvc_stage"] == "train_supervised"
    for name in ("test_accuracy", "test_macro_f1", "onnx_max_abs_diff"):
        assert name in run.data.metrics
    val_loss = client.get_metric_history(run_id, "val_loss")
    assert [m.step for m in sorted(val_loss, key=lambda m: m.step)] == list(range(6))
    assert client.get_metric_history(run_id, "grad_norm/network.features.0")
    images = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {
        "plots/learning_curves.png",
        "plots/gradient_norms.png",
        "plots/test_predictions.png",
    } <= images
    version = client.get_model_version_by_alias("dlpipe-classifier", "champion")
    assert version.run_id == run_id
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert {c.data.tags["dvc_stage"] for c in children} == {"evaluate", "export"}
    # Each stage's metrics file names its own run (`dvc exp show` has it as a column).
    by_stage = {c.data.tags["dvc_stage"]: c.info.run_id for c in children}
    for stage, file, expected in (
        ("train_supervised", "train.json", run_id),
        ("evaluate", "evaluate.json", by_stage["evaluate"]),
        ("export", "supervised.json", by_stage["export"]),
    ):
        written = json.loads((trained.metrics / file).read_text())[tracking.RUN_ID_KEY]
        assert written == expected, stage


def test_a_diverging_run_stops_with_the_learning_rate_named(trained, tmp_path, stores):
    stores(trained.mlflow_uri)
    train = quick_train_config(
        optimizer="minibatch_sgd", lr=1e5, epochs=5, divergence_factor=5.0, num_workers=2
    )
    with pytest.raises(UserError, match=r"diverged .* learning rate 100000"):
        train_supervised(
            ArchitectureConfig(),
            train,
            TrackingConfig(),
            data_dir=str(trained.prepared),
            output=str(tmp_path / "model"),
            metrics_path=str(tmp_path / "m.json"),
            plots_dir=str(tmp_path / "plots"),
        )
    assert not (tmp_path / "model").exists()  # nothing half-written
    client = MlflowClient(trained.mlflow_uri)
    failed = client.search_runs(
        [client.get_experiment_by_name("dlpipe-supervised").experiment_id],
        "tags.diverged = 'true'",
    )
    assert failed and failed[0].info.status == "FAILED"


def test_k_fold_tests_every_example_once_and_reports_the_spread(trained, tmp_path, stores):
    """`evaluate.folds: 2` on the digits: two models on a Ray Train worker, each tested on
    the half of the examples it never saw; a child MLflow run per fold."""
    stores(trained.mlflow_uri)
    summary = cross_validate(
        EvaluateConfig(folds=2),
        ArchitectureConfig(),
        # One worker a fold: two workers are test_two_workers_learn_the_digits' subject,
        # and a second worker process is ~9 s of each Ray Train run here. Two folds (each
        # Train run ~20 s here before its first epoch) of 4 epochs on half the digits.
        quick_train_config(epochs=4, num_workers=1),
        TrackingConfig(),
        data_dir=str(trained.prepared),
        metrics_path=str(tmp_path / "cross_validation.json"),
    )
    written = json.loads((tmp_path / "cross_validation.json").read_text())
    parent_run = written.pop(tracking.RUN_ID_KEY)  # the stage's own run, named in its file
    assert written == summary
    assert MlflowClient(trained.mlflow_uri).get_run(parent_run).data.tags["dvc_stage"] == (
        "cross_validate"
    )
    assert summary["folds"] == 2 and summary["examples"] == 1797  # train + val + test
    fold_sizes = [f["test_accuracy_examples"] for f in summary["per_fold"].values()]
    assert sum(fold_sizes) == summary["pooled_test_accuracy_examples"] == 1797
    accuracies = [f["test_accuracy"] for f in summary["per_fold"].values()]
    assert summary["test_accuracy_mean"] == pytest.approx(sum(accuracies) / 2)
    assert summary["test_accuracy_min"] == min(accuracies) > 0.8
    assert summary["test_accuracy_std"] >= 0.0
    low, high = summary["pooled_test_accuracy_ci95_low"], summary["pooled_test_accuracy_ci95_high"]
    assert low < summary["pooled_test_accuracy"] < high
    client = MlflowClient(trained.mlflow_uri)
    experiment = client.get_experiment_by_name("dlpipe-supervised").experiment_id
    stage_runs = client.search_runs([experiment], "tags.dvc_stage = 'cross_validate'")
    [parent] = [r for r in stage_runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.data.metrics["test_accuracy_mean"] == pytest.approx(summary["test_accuracy_mean"])
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["fold"] for c in children) == ["1", "2"]
    assert all(c.data.metrics["val_loss"] > 0 for c in children)  # each fold's curve logged
