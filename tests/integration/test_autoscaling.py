"""Replica autoscaling on the requests in flight at the replicas' own servers
(serving/autoscaling.py): up under concurrent load, back down when it stops."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from tests.helpers import declared_app

pytestmark = pytest.mark.integration

APP = "autoscale-test"
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 2,
    "look_back_period_s": 3,
    "upscale_delay_s": 1,
    "downscale_delay_s": 3,
    "policy": {"policy_function": "serving.autoscaling:in_flight_policy"},
}


def running_replicas(app: str) -> int:
    from ray import serve

    deployment = serve.status().applications[app].deployments["dlpipe"]
    return deployment.replica_states.get("RUNNING", 0)


def wait_for_replicas(app: str, count: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if running_replicas(app) == count:
            return True
        time.sleep(0.5)
    return False


def test_replicas_follow_the_requests_in_flight(trained, ray_dashboard):
    args = {"model": "models:/dlpipe-classifier@champion", "tracking_uri": trained.mlflow_uri}
    body = {"instances": np.load(trained.prepared / "x_test.npy")[:64].reshape(64, -1).tolist()}
    with declared_app(ray_dashboard, APP, args, {"autoscaling_config": AUTOSCALING}) as url:
        assert running_replicas(APP) == 1
        stop = threading.Event()
        failures: list[int] = []

        def client() -> None:  # one connection each: the kernel spreads connections
            with httpx.Client(base_url=url, timeout=30) as http:
                while not stop.is_set():
                    status = http.post("/v1/classify", json=body).status_code
                    if status != 200:
                        failures.append(status)

        clients = [threading.Thread(target=client, daemon=True) for _ in range(8)]
        for thread in clients:
            thread.start()
        try:
            scaled_up = wait_for_replicas(APP, 2, timeout_s=90)
        finally:
            stop.set()
            for thread in clients:
                thread.join()
        assert scaled_up, "8 clients, target 2 in flight per replica: expected 2 replicas"
        assert failures == []
        assert wait_for_replicas(APP, 1, timeout_s=90), "no load: expected back to 1 replica"
