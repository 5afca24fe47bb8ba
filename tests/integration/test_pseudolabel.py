"""Semi-supervised pseudo-labeling on a real Ray cluster with a real MLflow store."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from models.architecture import ArchitectureConfig
from pipelines.semisupervised.config import PseudoLabelConfig
from pipelines.semisupervised.prepare import SPLIT_KEYS, prepare_pseudolabel
from pipelines.semisupervised.train import ROUND_KEYS, TRAIN_KEYS, train_pseudolabel
from pipelines.stagekit import tracking
from pipelines.stagekit.config import ExportConfig, TrainConfig, view
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.model_bundle import MODEL_FILE
from pipelines.supervised.config import PrepareConfig
from pipelines.supervised.evaluate import evaluate
from pipelines.supervised.export import export
from pipelines.supervised.prepare import prepare
from serving.model_source import resolve_model
from serving.predictor import ClassifierPredictor
from tests.helpers import write_image_folder
from tests.integration.conftest import quick_train_config

pytestmark = pytest.mark.integration
DEFAULT_MODEL = ArchitectureConfig()


def split(pseudolabel: PseudoLabelConfig, data_dir: Path, output: Path) -> dict:
    """prepare_pseudolabel given only the keys it declares, as params.yaml would give them."""
    return prepare_pseudolabel(view(pseudolabel, SPLIT_KEYS), str(data_dir), str(output))


def train_rounds(
    train: TrainConfig,
    pseudolabel: PseudoLabelConfig,
    root: Path,
    tag: str = "",
    model: ArchitectureConfig = DEFAULT_MODEL,
) -> dict:
    """train_pseudolabel (default model) on root/pl, given only the keys it declares."""
    return train_pseudolabel(
        model,
        view(train, TRAIN_KEYS),
        view(pseudolabel, ROUND_KEYS),
        str(root / "pl"),
        str(root / f"model{tag}"),
        str(root / f"m{tag}.json"),
        str(root / f"plots{tag}"),
    )


def test_digits_rounds_baseline_tracking_and_export(trained, stores, tmp_path):
    uri = stores()
    pseudolabel = PseudoLabelConfig(
        method="teacher_student", rounds=1, epochs_per_round=6, labeled_fraction=0.1
    )
    out = tmp_path
    manifest = split(pseudolabel, trained.prepared, out / "pl")
    info = manifest["semi_supervised"]
    assert info["unlabeled_truth_known"] and info["labeled"] + info["unlabeled"] == 1257
    # One worker for the teacher, student and baseline: the rounds are under test here;
    # the other tests of this module train on two.
    figures = train_rounds(quick_train_config(num_workers=1), pseudolabel, out)
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
        experiment=pseudolabel.experiment,
        data_dir=str(out / "pl"),
        model_dir=str(out / "model"),
        metrics_path=str(out / "e.json"),
        plots_dir=str(out / "eplots"),
    )
    export(
        export_config=ExportConfig(),
        registered_model=pseudolabel.registered_model,
        experiment=pseudolabel.experiment,
        data_dir=str(out / "pl"),
        model_dir=str(out / "model"),
        evaluation_path=str(out / "e.json"),
        output=str(out / "export"),
        metrics_path=str(out / "x.json"),
    )
    version = client.get_model_version_by_alias("dlpipe-pseudolabel-classifier", "champion")
    assert version.run_id == parent_id
    files = resolve_model("models:/dlpipe-pseudolabel-classifier@champion", uri)
    predictor = ClassifierPredictor(files)
    assert predictor.info()["name"] == "dlpipe-pseudolabel-classifier"


def test_fixmatch_on_two_labels_per_digit_trains_one_tracked_run(trained, stores, tmp_path):
    uri = stores()
    pseudolabel = PseudoLabelConfig(  # fixmatch_epochs, not (rounds + 1) x epochs_per_round
        method="fixmatch",
        labeled_per_class=2,
        rounds=1,
        epochs_per_round=1,
        fixmatch_epochs=3,
        unlabeled_ratio=3,
    )
    split(pseudolabel, trained.prepared, tmp_path / "pl")
    figures = train_rounds(quick_train_config(), pseudolabel, tmp_path)
    assert figures["method"] == "fixmatch" and figures["labeled_count"] == 20
    assert "teacher_test_accuracy" not in figures  # no teacher in FixMatch
    assert figures["test_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert figures["pseudo_labels"] > 0 and "pseudo_label_accuracy_ci95_low" in figures
    assert figures["warnings"] == []  # the digits' splits are large enough

    client = MlflowClient(uri)
    parent_id = tracking.producing_run(tmp_path / "model" / MODEL_FILE, pseudolabel.experiment)
    assert client.get_run(parent_id).data.tags["method"] == "fixmatch"
    children = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_id}'",
    )
    assert {c.info.run_name for c in children} == {"fixmatch", "baseline-supervised-only"}
    fixmatch = next(c for c in children if c.info.run_name == "fixmatch")
    losses = client.get_metric_history(fixmatch.info.run_id, "train_loss")
    assert len(losses) == 3
    # The baseline takes as many labeled batches as FixMatch did: ~26 steps per FixMatch
    # epoch (1,237 pool images per 2 workers, 24 a step) against 2 on 20 labels alone.
    baseline = next(c for c in children if c.info.run_name == "baseline-supervised-only")
    baseline_losses = client.get_metric_history(baseline.info.run_id, "train_loss")
    assert len(baseline_losses) == figures["baseline_epochs"] > 30
    # The saved model is the supervised format: the evaluate stage takes it unchanged.
    scored = evaluate(
        experiment=pseudolabel.experiment,
        data_dir=str(tmp_path / "pl"),
        model_dir=str(tmp_path / "model"),
        metrics_path=str(tmp_path / "e.json"),
        plots_dir=str(tmp_path / "eplots"),
    )
    assert scored["test_accuracy"] == pytest.approx(figures["test_accuracy"])


def test_fixmatch_refuses_tables(stores, tmp_path):
    stores()
    table = tmp_path / "t.csv"
    rows = [f"{i % 7},{(i * 3) % 5},{'a' if i % 2 else 'b'}" for i in range(80)]
    table.write_text("x,y,label\n" + "\n".join(rows) + "\n")
    prepare(
        PrepareConfig(source=str(table), format="csv", feature_columns=("x", "y")),
        str(table),
        str(tmp_path / "prepared"),
    )
    pseudolabel = PseudoLabelConfig(method="fixmatch", labeled_per_class=3, epochs_per_round=1)
    split(pseudolabel, tmp_path / "prepared", tmp_path / "pl")
    with pytest.raises(UserError, match="fixmatch needs images.*use teacher_student"):
        train_rounds(quick_train_config(), pseudolabel, tmp_path, model=ArchitectureConfig("mlp"))


def test_user_folders_then_a_threshold_that_keeps_nothing_then_no_unlabeled_data(
    ray_cluster, stores, tmp_path
):
    stores()
    labeled = write_image_folder(
        tmp_path / "labeled", {"dark": [(12, 12)] * 12, "light": [(9, 14)] * 12}
    )
    pool = write_image_folder(tmp_path / "pool", {"a": [(10, 10)] * 8, "b": [(16, 8)] * 9})
    prepare_config = PrepareConfig(
        source=str(labeled), image_size=(8, 8), val_fraction=0.2, test_fraction=0.2
    )
    pseudolabel = PseudoLabelConfig(
        method="teacher_student",
        unlabeled_source=str(pool),
        rounds=1,
        epochs_per_round=3,
        confidence_threshold=0.5,
    )
    prepare(prepare_config, str(labeled), str(tmp_path / "prepared"))
    manifest = split(pseudolabel, tmp_path / "prepared", tmp_path / "pl")
    assert manifest["semi_supervised"]["unlabeled"] == 17
    assert not manifest["semi_supervised"]["unlabeled_truth_known"]
    # 17 pool images on 2 workers: uneven worker shards
    figures = train_rounds(quick_train_config(num_workers=2), pseudolabel, tmp_path)
    assert figures["pseudo_labels"] > 0 and not figures["fell_back_to_teacher"]
    assert "pseudo_label_accuracy" not in figures  # no truth for the user's pool
    # 24 labeled images: validation and test splits of 5, and the figures say so.
    assert any("the test split has 5 examples" in w for w in figures["warnings"])
    assert figures["test_accuracy_examples"] == 5
    assert figures["test_accuracy_ci95_high"] - figures["test_accuracy_ci95_low"] > 0.4

    # Softmax never reaches exactly 1.0: nothing is kept, the teacher is the final model.
    strict = dataclasses.replace(pseudolabel, confidence_threshold=1.0, epochs_per_round=1)
    figures = train_rounds(quick_train_config(num_workers=1), strict, tmp_path, "2")
    assert figures["fell_back_to_teacher"] is True and figures["fallback_round"] == 1
    assert figures["pseudo_labels"] == 0
    assert figures["test_accuracy"] == figures["teacher_test_accuracy"]
    assert (tmp_path / "model2" / "model.pt").is_file()

    (tmp_path / "nothing").mkdir()
    no_pool = dataclasses.replace(pseudolabel, unlabeled_source=str(tmp_path / "nothing"))
    with pytest.raises(UserError, match="no .png/.jpg images in the unlabeled folder"):
        split(no_pool, tmp_path / "prepared", tmp_path / "pl2")
