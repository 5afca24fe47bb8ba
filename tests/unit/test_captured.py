"""Captured requests read back (serving/captured.py): `dlpipe drift`'s report and `dlpipe
capture export`'s pool, from real capture files of the app answering over HTTP and a
model registered in a real MLflow store."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from serving.capture import CaptureConfig, RequestCapture
from serving.captured import CaptureReadError, drift_report, export_pool, read_captures
from serving.drift import REFERENCE_FILE, DriftConfig, feature_names, image_rows
from serving.drift import reference_statistics as statistics
from tests.unit.test_predictor import export_dir  # noqa: F401 (a fixture: the tiny export)

MODEL = "tiny-captured"


@pytest.fixture(scope="module")
def registered(export_dir, tmp_path_factory):  # noqa: F811
    """The tiny export, with a drift reference of dark images, as version 1 of MODEL in a
    real MLflow store (once for the module: a new store costs seconds); returns its URI."""
    import mlflow

    from pipelines.stagekit import tracking

    tmp_path = tmp_path_factory.mktemp("registry")
    export = shutil.copytree(export_dir, tmp_path / "export")
    dark = np.random.default_rng(0).uniform(0.0, 0.5, (500, 1, 4, 4)).astype(np.float32)
    names = feature_names("image_grid", [1, 4, 4], None)
    (export / REFERENCE_FILE).write_text(
        json.dumps(statistics("image_grid", image_rows(dark), names))
    )
    card = json.loads((export / "model_card.json").read_text())
    card.update(name=MODEL, drift_reference=REFERENCE_FILE)
    (export / "model_card.json").write_text(json.dumps(card))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment_name="captured")
        with mlflow.start_run() as run:
            pass
        tracking.register_onnx_model(
            run.info.run_id,
            export / "model.onnx",
            export / "model_card.json",
            MODEL,
            "champion",
            extra_files=(export / "parity_sample.npz", export / REFERENCE_FILE),
        )
    mlflow.set_tracking_uri(None)
    return uri


def capture_traffic(uri: str, directory, rows: np.ndarray) -> None:
    """The app serving MODEL@champion, every answer captured, one request per row."""
    from starlette.testclient import TestClient

    from serving.http_api import HttpApi, Limits
    from serving.model_slots import LoadedModels, load_predictor

    predictor = load_predictor("classifier", f"models:/{MODEL}@champion", uri)
    api = HttpApi(LoadedModels(classifier=predictor), Limits())
    api.capture = RequestCapture(CaptureConfig(rate=1.0, directory=str(directory)))
    http = TestClient(api)
    for row in rows:
        assert http.post("/v1/classify", json={"instances": [row.tolist()]}).status_code == 200
    api.capture.close()


def test_the_report_finds_the_drift_the_captured_inputs_carry(registered, tmp_path):
    rng = np.random.default_rng(1)
    calm, shifted = tmp_path / "calm", tmp_path / "shifted"
    capture_traffic(registered, calm, rng.uniform(0.0, 0.5, (300, 16)))
    capture_traffic(registered, shifted, rng.uniform(0.0, 0.5, (300, 16)) ** 0.3)
    with (shifted / "half-written.jsonl").open("w") as partial:
        partial.write('{"request_id": "x", "route": ')  # a writer stopped mid-line
    with (shifted / "edited.jsonl").open("w") as edited:  # whole records, unusable ones
        record = {"request_id": "y", "route": "/v1/classify", "model": MODEL, "version": "1"}
        edited.write(json.dumps({**record, "body": {"instances": [[0.1] * 16]}}) + "\n")  # no time
        edited.write(json.dumps({**record, "time": 0.0, "body": {"instances": [[0.1] * 3]}}) + "\n")

    config = DriftConfig(window=200)
    [few] = drift_report(calm, registered, DriftConfig(window=1000))["models"]
    assert few["drifted"] is None  # 300 inputs: too few to judge against a window of 1,000
    [calm_entry] = drift_report(calm, registered, config)["models"]
    assert calm_entry["version"] == "1" and calm_entry["inputs"] == 300
    assert not calm_entry["drifted"] and calm_entry["window_alarms"] == 0
    report = drift_report(shifted, registered, config)
    [entry] = report["models"]
    assert entry["drifted"] and entry["first_alarm_at"] == 200  # the first full window
    assert report["skipped_lines"] == 3
    assert any("half-written.jsonl:1" in why for why in report["skipped"])
    assert any("request y: instances[0]" in why for why in report["skipped"])  # 3 values


def test_export_writes_each_captured_input_once_as_a_png_the_pipeline_reads(registered, tmp_path):
    from pipelines.stagekit.readers import read_unlabeled_images

    rows = np.random.default_rng(2).integers(0, 17, (40, 16)) / 16  # digits' pixel levels
    capture_traffic(registered, tmp_path / "captures", rows)
    pool = tmp_path / "pool"
    done = export_pool(tmp_path / "captures", pool, registered, track=False)
    assert done["written"] == 40 and done["already_there"] == 0
    again = export_pool(tmp_path / "captures", pool, registered, track=False)
    assert again["written"] == 0 and again["already_there"] == 40  # nothing twice, nothing lost
    images = read_unlabeled_images(pool, (4, 4), grayscale=True)
    assert images.shape == (40, 1, 4, 4)
    # The pixels come back as sent, to the 1/255 of an 8-bit PNG.
    sent = sorted(map(tuple, rows.round(2)))
    back = sorted(map(tuple, images.reshape(40, 16).round(2)))
    np.testing.assert_allclose(back, sent, atol=0.01)


def test_nothing_to_read_is_an_error_naming_the_directory(registered, tmp_path):
    with pytest.raises(CaptureReadError, match="no capture directory"):
        read_captures(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptureReadError, match="no captured requests"):
        read_captures(tmp_path / "empty")
