"""Semi-supervised pseudo-labeling on a real Ray cluster with a real MLflow store."""

from __future__ import annotations

import dataclasses

import pytest
from mlflow.tracking import MlflowClient

from pipelines.semisupervised.prepare import prepare_pseudolabel
from pipelines.semisupervised.train import train_pseudolabel
from pipelines.stagekit import tracking
from pipelines.stagekit.config import PipelineConfig, PrepareConfig, PseudoLabelConfig
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.model_bundle import MODEL_FILE
from pipelines.supervised.evaluate import evaluate
from pipelines.supervised.export import export, with_overrides
from pipelines.supervised.prepare import prepare
from serving.model_source import resolve_model
from serving.predictor import ClassifierPredictor
from tests.helpers import write_image_folder
from tests.integration.conftest import quick_train_config

pytestmark = pytest.mark.integration


def test_digits_rounds_baseline_tracking_and_export(trained, stores, tmp_path):
    uri = stores()
    config = PipelineConfig(
        train=quick_train_config(),
        pseudolabel=PseudoLabelConfig(rounds=1, epochs_per_round=6, labeled_fraction=0.1),
    )
    out = tmp_path
    manifest = prepare_pseudolabel(config, str(trained.prepared), str(out / "pl"))
    info = manifest["semi_supervised"]
    assert info["unlabeled_truth_known"] and info["labeled"] + info["unlabeled"] == 1257
    figures = train_pseudolabel(
        config, str(out / "pl"), str(out / "model"), str(out / "m.json"), str(out / "plots")
    )
    for key in (
        "labeled_count",
        "test_accuracy",
        "baseline_test_accuracy",
        "pseudo_label_accuracy",
        "teacher_test_accuracy",
    ):
        assert key in figures
    assert figures["labeled_count"] == info["labeled"]
    assert figures["pseudo_labels"] > 0 and figures["pseudo_label_accuracy"] > 0.5
    assert (out / "plots" / "rounds.csv").read_text().startswith("round,pseudo_labels")

    client = MlflowClient(uri)
    parent_id = tracking.producing_run(out / "model" / MODEL_FILE, PseudoLabelConfig().experiment)
    parent = client.get_run(parent_id)
    assert parent.data.metrics["baseline_test_accuracy"] == pytest.approx(
        figures["baseline_test_accuracy"]
    )
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert {c.info.run_name for c in children} == {
        "round-0-teacher",
        "round-1-student",
        "baseline-supervised-only",
    }
    student = next(c for c in children if c.info.run_name == "round-1-student")
    assert student.data.params["pseudo_labels"] == str(figures["pseudo_labels"])
    assert len(client.get_metric_history(student.info.run_id, "val_loss")) == 6

    # The student takes the supervised evaluate/export path and the classify predictor unchanged.
    evaluate(
        config,
        str(out / "pl"),
        str(out / "model"),
        str(out / "e.json"),
        str(out / "eplots"),
        experiment=config.pseudolabel.experiment,
    )
    named = with_overrides(
        config, config.pseudolabel.registered_model, config.pseudolabel.experiment
    )
    export(
        named,
        str(out / "pl"),
        str(out / "model"),
        str(out / "e.json"),
        str(out / "export"),
        str(out / "x.json"),
    )
    version = client.get_model_version_by_alias("dlpipe-pseudolabel-classifier", "champion")
    assert version.run_id == parent_id
    files = resolve_model("models:/dlpipe-pseudolabel-classifier@champion", uri)
    predictor = ClassifierPredictor(files)
    assert predictor.info()["name"] == "dlpipe-pseudolabel-classifier"


def test_user_folders_then_a_threshold_that_keeps_nothing_then_no_unlabeled_data(
    ray_cluster, stores, tmp_path
):
    stores()
    labeled = write_image_folder(
        tmp_path / "labeled", {"dark": [(12, 12)] * 12, "light": [(9, 14)] * 12}
    )
    pool = write_image_folder(tmp_path / "pool", {"a": [(10, 10)] * 8, "b": [(16, 8)] * 9})
    config = PipelineConfig(
        prepare=PrepareConfig(
            source=str(labeled), image_size=(8, 8), val_fraction=0.2, test_fraction=0.2
        ),
        train=quick_train_config(num_workers=2),  # 17 pool images: uneven worker shards
        pseudolabel=PseudoLabelConfig(
            unlabeled_source=str(pool), rounds=1, epochs_per_round=3, confidence_threshold=0.5
        ),
    )
    prepare(config.prepare, str(labeled), str(tmp_path / "prepared"))
    manifest = prepare_pseudolabel(config, str(tmp_path / "prepared"), str(tmp_path / "pl"))
    assert manifest["semi_supervised"]["unlabeled"] == 17
    assert not manifest["semi_supervised"]["unlabeled_truth_known"]
    figures = train_pseudolabel(
        config,
        str(tmp_path / "pl"),
        str(tmp_path / "model"),
        str(tmp_path / "m.json"),
        str(tmp_path / "plots"),
    )
    assert figures["pseudo_labels"] > 0 and not figures["fell_back_to_teacher"]
    assert "pseudo_label_accuracy" not in figures  # no truth for the user's pool

    # Softmax never reaches exactly 1.0: nothing is kept, the teacher is the final model.
    strict = dataclasses.replace(
        config,
        train=quick_train_config(num_workers=1),
        pseudolabel=dataclasses.replace(
            config.pseudolabel, confidence_threshold=1.0, epochs_per_round=2
        ),
    )
    figures = train_pseudolabel(
        strict,
        str(tmp_path / "pl"),
        str(tmp_path / "model2"),
        str(tmp_path / "m2.json"),
        str(tmp_path / "plots2"),
    )
    assert figures["fell_back_to_teacher"] is True and figures["fallback_round"] == 1
    assert figures["pseudo_labels"] == 0
    assert figures["test_accuracy"] == figures["teacher_test_accuracy"]
    assert (tmp_path / "model2" / "model.pt").is_file()

    (tmp_path / "nothing").mkdir()
    no_pool = dataclasses.replace(
        config,
        pseudolabel=dataclasses.replace(
            config.pseudolabel, unlabeled_source=str(tmp_path / "nothing")
        ),
    )
    with pytest.raises(UserError, match="no .png/.jpg images in the unlabeled folder"):
        prepare_pseudolabel(no_pool, str(tmp_path / "prepared"), str(tmp_path / "pl2"))
