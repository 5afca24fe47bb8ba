"""Shared fixtures: small real data sets and, for integration tests, one local Ray cluster."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def digits_folder(tmp_path_factory) -> Path:
    """The bundled digits written as an image folder, exactly as the ingest stage does."""
    from pipelines.supervised.ingest_digits import ingest_digits

    root = tmp_path_factory.mktemp("raw") / "digits"
    ingest_digits(str(root))
    return root


@pytest.fixture(scope="session")
def ray_context():
    """One local Ray instance for the whole session: 2 CPUs, so two Train workers fit.

    The dashboard stays on, as in the stages' own `ray.init()`: Ray Train's
    PlacementGroupCleaner asks the State API (served by the dashboard) whether a Train
    controller is still alive. Without it, the worker placement group of a trial that Tune
    stops early (ASHA) is never removed, and in this long-lived driver the leaked CPUs
    starve every later Train run (seen as a CI hang in test_tune)."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=True, logging_level="WARNING")
    yield context
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_cluster(ray_context) -> str:
    """The session cluster's address (RAY_ADDRESS for subprocesses that should join it)."""
    return ray_context.address_info["gcs_address"]


@pytest.fixture(scope="session")
def ray_dashboard(ray_context) -> str:
    """The session cluster's dashboard URL (Serve's REST API, the State API)."""
    return f"http://{ray_context.dashboard_url}"


@pytest.fixture()
def stores(tmp_path, monkeypatch):
    """Point the tracking store and the training checkpoints at this test's own real,
    temporary ones. Call it (optionally with an existing tracking URI); returns the URI."""

    def point(tracking_uri: str | None = None) -> str:
        uri = tracking_uri or f"sqlite:///{tmp_path / 'tracking.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("DLPIPE_STORAGE", str(tmp_path / "checkpoints"))
        return uri

    return point
