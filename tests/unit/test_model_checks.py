"""A model is served only if its files are the exported ones and agree with torch."""

import json
import shutil

import numpy as np
import pytest

from serving.model_checks import ModelRejected, sha256, verify_model
from serving.model_slots import load_predictor
from serving.model_source import resolve_model
from tests.helpers import swap_in_store
from tests.unit.test_predictor import export_dir  # noqa: F401  (the exported tiny model)


@pytest.fixture()
def copy(export_dir, tmp_path):  # noqa: F811
    return shutil.copytree(export_dir, tmp_path / "model")


def test_the_exported_files_pass(export_dir):  # noqa: F811
    verify_model(resolve_model(str(export_dir)))
    predictor = load_predictor("classifier", str(export_dir))
    assert predictor.card["name"] == "tiny"


def test_a_changed_graph_is_refused_by_its_hash(copy):
    graph = copy / "model.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    with pytest.raises(ModelRejected, match=r"model\.onnx has sha256 .* not the file"):
        verify_model(resolve_model(str(copy)))


def test_a_graph_that_no_longer_matches_torch_is_refused(copy):
    # The sample's recorded torch outputs are changed (and its hash updated): the graph now
    # disagrees with "torch" by 0.5, far over atol.
    card = json.loads((copy / "model_card.json").read_text())
    with np.load(copy / "parity_sample.npz") as arrays:
        stored = {k: arrays[k] for k in arrays.files}
    stored["model.onnx/output/output"] = stored["model.onnx/output/output"] + 0.5
    np.savez(copy / "parity_sample.npz", **stored)
    card["parity_sample"]["sha256"] = sha256(copy / "parity_sample.npz")
    (copy / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelRejected, match=r"output output differs from torch's by 0\.5"):
        verify_model(resolve_model(str(copy)))


def test_a_changed_sample_or_a_card_without_one_is_refused(copy):
    (copy / "parity_sample.npz").write_bytes(b"junk")
    with pytest.raises(ModelRejected, match="parity_sample.npz does not match its sha256"):
        verify_model(resolve_model(str(copy)))
    card = json.loads((copy / "model_card.json").read_text())
    del card["parity_sample"]
    (copy / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelRejected, match="no parity_sample .* re-run its export stage"):
        load_predictor("classifier", str(copy))


def test_a_registry_model_is_checked_against_the_hashes_the_registry_records(
    export_dir,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    # A real MLflow store. The card travels with the files, so rewriting the store's copy of
    # the graph *and* its card passes the card check; the registry's own record does not move.
    import mlflow
    from mlflow import MlflowClient

    from pipelines.stagekit import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_name="checks")
    with mlflow.start_run() as run:
        pass
    version = tracking.register_onnx_model(
        run.info.run_id,
        export_dir / "model.onnx",
        export_dir / "model_card.json",
        "tiny-classifier",
        "champion",
        extra_files=(export_dir / "parity_sample.npz",),
    )
    client = MlflowClient(uri)
    tags = client.get_model_version("tiny-classifier", version).tags
    assert tags["sha256/model.onnx"] == sha256(export_dir / "model.onnx")
    files = resolve_model("models:/tiny-classifier@champion", uri)
    assert files.registry_hashes == {"model.onnx": tags["sha256/model.onnx"]}
    verify_model(files)

    swap_in_store(uri, "tiny-classifier", version)
    with pytest.raises(ModelRejected, match=r"model\.onnx has sha256 .* the registry records"):
        load_predictor("classifier", "models:/tiny-classifier@champion", uri)

    client.delete_model_version_tag("tiny-classifier", version, "sha256/model.onnx")
    with pytest.raises(ModelRejected, match="registry records no sha256 for model.onnx"):
        load_predictor("classifier", "models:/tiny-classifier@champion", uri)
