"""The Serve app with API keys, over real HTTP: who gets in, how often, what a too-large
body reads as, and that the key shows up nowhere (Ray's logs, Serve's config, answers)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest

from serving.auth import hash_key
from serving.deploy import serve_details
from tests.helpers import declared_app

pytestmark = pytest.mark.integration

KEY = "integration-secret-7f3a9c0e2b"
WRONG = "integration-wrong-4d1e8b6a5c"
RATE = 20


@pytest.fixture(scope="module")
def secured(trained, ray_dashboard):
    args = {
        "model": "models:/dlpipe-classifier@champion",
        "tracking_uri": trained.mlflow_uri,
        "http": {
            "host": "0.0.0.0",  # allowed: keys are set
            "api_keys": {"tests": hash_key(KEY)},
            "max_requests_per_s_per_key": RATE,
        },
    }
    with declared_app(ray_dashboard, "secured", args) as url:
        yield url


def instance(trained) -> list[list[float]]:
    import numpy as np

    return np.load(trained.prepared / "x_test.npy")[:1].reshape(1, -1).tolist()


def test_only_the_probes_answer_without_a_key(secured, trained):
    body = {"instances": instance(trained)}
    with httpx.Client(base_url=secured, timeout=30) as http:
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").json()["status"] == "ready"
        for headers in ({}, {"Authorization": f"Bearer {WRONG}"}, {"Authorization": KEY}):
            for method, path in [("GET", "/v1/models"), ("GET", "/openapi.json")]:
                assert http.request(method, path, headers=headers).status_code == 401
            response = http.post("/v1/classify", json=body, headers=headers)
            assert response.status_code == 401 and WRONG not in response.text
        answer = http.post("/v1/classify", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == "dlpipe-classifier"


def test_a_key_over_its_rate_reads_429_and_retry_after(secured, trained):
    body = {"instances": instance(trained)}
    headers = {"Authorization": f"Bearer {KEY}"}
    answers = []
    # The same key answered the test before: a second refills its bucket to the full burst.
    time.sleep(1.0)
    with httpx.Client(base_url=secured, timeout=30, headers=headers) as http:
        # Until the first 429: a slow machine sends fewer requests a second, and the bucket
        # refills meanwhile (RATE a second, after a burst of RATE).
        while len(answers) < 20 * RATE and (not answers or answers[-1].status_code != 429):
            answers.append(http.post("/v1/classify", json=body))
    codes = [a.status_code for a in answers]
    assert set(codes) == {200, 429} and codes.count(200) >= RATE  # the burst got through
    refused = answers[-1]
    assert int(refused.headers["Retry-After"]) >= 1 and "rate limit" in refused.json()["detail"]


def test_a_body_over_the_limit_reads_413(secured):
    time.sleep(1.0)  # the test before ended on a 429 of this key: let its bucket refill
    big = b'{"instances": [[' + b"0.5, " * (4 * 2**20) + b"0.5]]}"  # 20 MB, over 16 MiB
    request = urllib.request.Request(
        f"{secured}/v1/classify",
        data=big,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413 and "byte limit" in refused.value.read().decode()


def test_the_key_is_in_no_log_config_or_answer(secured, ray_context, ray_dashboard):
    httpx.get(f"{secured}/v1/models", headers={"Authorization": f"Bearer {WRONG}"})
    httpx.get(f"{secured}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    details = json.dumps(serve_details(ray_dashboard))
    assert hash_key(KEY) in details  # Serve's config carries the hash ...
    assert KEY not in details  # ... never the key
    logs = Path(ray_context.address_info["session_dir"]) / "logs"
    leaked = [
        str(path)
        for path in logs.rglob("*")
        if path.is_file() and any(k.encode() in path.read_bytes() for k in (KEY, WRONG))
    ]
    assert not leaked, f"an API key is in {leaked}"
