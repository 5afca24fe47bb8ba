"""The Ray Serve app over real HTTP, serving the model registered by the pipeline run."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import served_app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(trained, ray_dashboard):
    with served_app(
        ray_dashboard,
        "dlpipe",
        {"model": "models:/dlpipe-classifier@champion", "tracking_uri": trained.mlflow_uri},
    ) as client:
        yield client


def digit_png(digits_folder: Path, label: str) -> str:
    path = min((digits_folder / label).glob("*.png"))
    return base64.b64encode(path.read_bytes()).decode()


def test_health_and_model_listing(server):
    assert server.get("/healthz").json() == {"status": "ok"}
    [model] = server.get("/v1/models").json()["models"]
    assert model["name"] == "dlpipe-classifier"
    assert model["source"] == "models:/dlpipe-classifier@champion"
    assert model["metrics"]["test_accuracy"] > 0.9
    assert model["providers"] == ["CPUExecutionProvider"]


def test_classify_images_and_feature_vectors(server, trained, digits_folder):
    response = server.post(
        "/v1/classify", json={"images": [digit_png(digits_folder, d) for d in "037"]}
    )
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [p["label"] for p in predictions] == ["0", "3", "7"]
    assert sum(predictions[0]["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)

    x_test = np.load(trained.prepared / "x_test.npy")[:16]
    y_test = np.load(trained.prepared / "y_test.npy")[:16]
    response = server.post("/v1/classify", json={"instances": x_test.reshape(16, -1).tolist()})
    assert response.status_code == 200
    labels = [int(p["label"]) for p in response.json()["predictions"]]
    assert np.mean(np.array(labels) == y_test) >= 0.8


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"instances": [[0.1] * 64, [0.1] * 63]}, "instances"),
        ({"images": ["@@@"]}, "images"),
        ({"images": [base64.b64encode(b"not an image").decode()]}, "images"),
        ({"instances": [[0.1] * 64], "images": ["x"]}, "exactly one"),
        ({"instances": []}, "empty"),
        ({"pixels": [[0.1] * 64]}, "pixels"),
        ({"instances": [["a"] * 64]}, "instances"),
    ],
)
def test_bad_requests_get_a_422_naming_the_field(server, body, field):
    response = server.post("/v1/classify", json=body)
    assert response.status_code == 422
    assert field in response.text


def test_non_finite_and_non_json_bodies_are_rejected_and_the_app_keeps_serving(
    server, digits_folder
):
    nan = server.post(
        "/v1/classify",
        content='{"instances": [[NaN' + ", 0.1" * 63 + "]]}",
        headers={"Content-Type": "application/json"},
    )
    assert nan.status_code == 422
    garbage = server.post(
        "/v1/classify", content=b"\xff\xfe not json", headers={"Content-Type": "application/json"}
    )
    assert garbage.status_code == 400  # not JSON at all: malformed syntax, not a bad field
    ok = server.post("/v1/classify", json={"images": [digit_png(digits_folder, "5")]})
    assert ok.status_code == 200 and ok.json()["predictions"][0]["label"] == "5"


def test_concurrent_requests_batched_together_each_get_their_own_answer(server, trained):
    """/v1/classify batches concurrent requests into one onnxruntime call: each request
    must still get the predictions of its own inputs."""
    from concurrent.futures import ThreadPoolExecutor

    x_test = np.load(trained.prepared / "x_test.npy")
    # Spread over the split (it is ordered by class): many different answers to mix up.
    images = x_test[np.linspace(0, len(x_test) - 1, 48).astype(int)].reshape(48, -1)
    one_by_one = [
        server.post("/v1/classify", json={"instances": [row.tolist()]}).json()["predictions"]
        for row in images
    ]
    with ThreadPoolExecutor(16) as pool:
        together = list(
            pool.map(
                lambda row: server.post("/v1/classify", json={"instances": [row.tolist()]}),
                images,
            )
        )
    assert all(r.status_code == 200 for r in together)
    together = [r.json()["predictions"] for r in together]
    # Batched and single onnxruntime calls may differ in the last float bits, not more.
    assert [p[0]["label"] for p in together] == [p[0]["label"] for p in one_by_one]
    for alone, batched in zip(one_by_one, together):
        assert batched[0]["confidence"] == pytest.approx(alone[0]["confidence"], abs=1e-5)
    assert len({p[0]["label"] for p in one_by_one}) > 5


def test_fuzzed_from_its_own_openapi_document_no_5xx_and_still_healthy(server):
    """The fast subset of `make fuzz` (benchmarks/fuzz.py): schemathesis with every check
    (a schema-valid request rejected, or an invalid one accepted, fails it) and the hostile
    images and bodies, against the Serve app."""
    from benchmarks.fuzz import fuzz

    report = fuzz(str(server.base_url).rstrip("/"), examples=40, hostile_examples=25)
    assert report["schemathesis"]["failures"] == [], report["schemathesis"]
    assert all(c["5xx"] == 0 for c in report["endpoints"].values()), report["endpoints"]
    assert report["endpoints"]["/v1/classify"]["cases"] >= 40
    assert {k: v["broken"] for k, v in report["hostile"].items()} == {
        "hostile images": [],
        "JSON parser strain": [],
    }
    assert report["healthy_after"] and report["met"]
