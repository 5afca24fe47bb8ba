"""Swapping the served model by moving its registry alias: deployed as `dlpipe serve` does
(Serve's config API), reloaded as `dlpipe serve reload` does, under a steady 200 requests/s
that must see no failure; a version failing its checks leaves the old one serving."""

from __future__ import annotations

import json
import time
import urllib.request

import httpx
import numpy as np
import pytest

from serving.deploy import reload_models, wait_for_versions
from tests.helpers import SteadyLoad, declared_app, register_export_copy, swap_in_store

pytestmark = pytest.mark.integration

APP = "reload-test"
MODEL = "reload-test-classifier"


@pytest.fixture(scope="module")
def served(trained, ray_dashboard, tmp_path_factory):
    # A registered model of this module's own: its versions and alias move here, and the
    # session's dlpipe-classifier@champion stays as the other modules expect it.
    register_copy(trained, tmp_path_factory.mktemp("first"))
    args = {"model": f"models:/{MODEL}@champion", "tracking_uri": trained.mlflow_uri}
    with declared_app(ray_dashboard, APP, args) as url:
        yield url


def register_copy(trained, tmp_path, tamper: bool = False) -> str:
    return register_export_copy(trained, tmp_path, MODEL, tamper=tamper)


def models(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/v1/models") as response:
        return json.loads(response.read())


def test_alias_swap_under_200_requests_per_s_fails_no_request(
    served, trained, ray_dashboard, tmp_path
):
    before = models(served)
    [classifier] = before["models"]
    old_version = classifier["version"]
    assert classifier["alias"] == "champion" and classifier["failed_reload"] is None

    new_version = register_copy(trained, tmp_path)
    assert models(served)["models"][0]["version"] == old_version  # nothing moves by itself

    x = np.load(trained.prepared / "x_test.npy")[:2].reshape(2, -1).tolist()
    with SteadyLoad(served, {"instances": x}, rate=200) as load:
        time.sleep(1.5)
        versions = reload_models(ray_dashboard, APP, trained.mlflow_uri)
        assert versions == {"classifier": new_version}
        settled = wait_for_versions(served, versions, timeout_s=60)
        time.sleep(1.5)

    assert settled["classifier"]["version"] == new_version
    statuses = [status for status, _ in load.answers]
    assert statuses.count(200) == len(statuses), [a for a in load.answers if a[0] != 200][:5]
    # The load really ran throughout: at 200/s asked, at least half of it answered (a busy
    # 2-core CI machine slows the Python client itself), on both sides of the swap.
    rate = len(statuses) / load.seconds
    assert rate >= 100, f"only {rate:.0f} requests/s were sent"
    served_versions = [version for _, version in load.answers]
    assert served_versions[0] == old_version and served_versions[-1] == new_version
    assert min(served_versions.count(old_version), served_versions.count(new_version)) >= 100
    # Swapped in place: the same replica answers, it was not restarted.
    assert models(served)["replica"] == before["replica"]


def test_a_version_failing_its_checks_leaves_the_old_one_serving(
    served, trained, ray_dashboard, tmp_path
):
    serving_version = models(served)["models"][0]["version"]
    bad_version = register_copy(trained, tmp_path, tamper=True)

    versions = reload_models(ray_dashboard, APP, trained.mlflow_uri)
    settled = wait_for_versions(served, versions, timeout_s=60)

    classifier = settled["classifier"]
    assert classifier["version"] == serving_version
    assert classifier["failed_reload"]["version"] == bad_version
    assert "model.onnx has sha256" in classifier["failed_reload"]["error"]
    x = np.load(trained.prepared / "x_test.npy")[:1].reshape(1, -1).tolist()
    response = httpx.post(f"{served}/v1/classify", json={"instances": x})
    assert response.status_code == 200 and response.json()["version"] == serving_version
    scrape_until(
        lambda text: series(text, "ray_dlpipe_failed_reloads_total", slot="classifier") >= 1
    )


def test_a_version_whose_files_were_swapped_in_the_store_is_refused_by_its_registry_hash(
    served, trained, ray_dashboard, tmp_path
):
    serving_version = models(served)["models"][0]["version"]
    swapped = register_copy(trained, tmp_path)
    swap_in_store(trained.mlflow_uri, MODEL, swapped)  # graph and card agree: only the
    # registry's own record of the graph's hash tells

    versions = reload_models(ray_dashboard, APP, trained.mlflow_uri)
    settled = wait_for_versions(served, versions, timeout_s=60)

    classifier = settled["classifier"]
    assert classifier["version"] == serving_version
    assert classifier["failed_reload"]["version"] == swapped
    assert "the registry records" in classifier["failed_reload"]["error"]


def scrape_until(predicate, timeout_s: float = 60) -> str:
    """The node's Prometheus page (Ray's metrics agent), once `predicate(text)` holds;
    Ray exports recorded values every few seconds."""
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    deadline = time.monotonic() + timeout_s
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if predicate(text):
            return text
        time.sleep(2)
    raise AssertionError(
        "metrics never showed up:\n"
        + "\n".join(line for line in text.splitlines() if "dlpipe" in line)
    )


def series(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_prometheus_metrics_count_answers_by_route_code_and_version(served, trained):
    version = models(served)["models"][0]["version"]
    x = np.load(trained.prepared / "x_test.npy")[:1].reshape(1, -1).tolist()
    with httpx.Client(base_url=served) as client:
        for _ in range(5):
            assert client.post("/v1/classify", json={"instances": x}).status_code == 200
        assert client.post("/v1/classify", json={"instances": [[0.5] * 3]}).status_code == 422

    def ready(text: str) -> bool:
        return series(text, "ray_dlpipe_requests_total", code="422") >= 1

    text = scrape_until(ready)
    ok = series(
        text, "ray_dlpipe_requests_total", route="/v1/classify", code="200", version=version
    )
    assert ok >= 5
    assert series(text, "ray_dlpipe_request_seconds_count", route="/v1/classify") >= ok + 1
    # The served registered model's name (other modules' apps leave dlpipe-classifier series).
    assert series(text, "ray_dlpipe_batch_size_count", model=MODEL) >= 1
    assert series(text, "ray_dlpipe_model_version", slot="classifier") == float(version)
