"""Champion and challenger on the real Serve app over HTTP, changed live through the
deployment's user_config as `dlpipe serve challenger | promote | rollback` change it:
canary share, shadow comparison, promotion and rollback under a steady load that must see
no failure; each bad setting refused with the setting named, the champion untouched."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
from mlflow import MlflowClient

from benchmarks.lifecycle import digit_streams, drift_trial, models_of
from serving.deploy import (
    DeployError,
    apply_apps,
    declared_app,
    set_capture,
    set_drift,
    user_config,
)
from serving.promotion import (
    PREVIOUS_ALIAS,
    PromotionPolicy,
    promote,
    rollback,
    set_challenger,
    slot_entry,
    wait_for_challenger,
)
from tests.helpers import SteadyLoad, register_export_copy
from tests.helpers import declared_app as deployed_app

pytestmark = pytest.mark.integration

APP = "lifecycle-test"
MODEL = "lifecycle-test-classifier"


@pytest.fixture(scope="module")
def served(trained, ray_dashboard, tmp_path_factory):
    # A registered model of this module's own: version 1 champion, version 2 challenger.
    versions = [
        register_export_copy(trained, tmp_path_factory.mktemp(alias), MODEL, alias)
        for alias in ("champion", "challenger")
    ]
    args = {"model": f"models:/{MODEL}@champion", "tracking_uri": trained.mlflow_uri}
    with deployed_app(ray_dashboard, APP, args) as url:
        yield url, versions


@pytest.fixture
def registry_env(trained, monkeypatch):
    # The CLI points MLflow at the app's store; here, the session's.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.mlflow_uri)


def body(trained) -> dict:
    x = np.load(trained.prepared / "x_test.npy")[:2].reshape(2, -1).tolist()
    return {"instances": x}


def test_bad_settings_are_refused_by_name_and_the_champion_serves_on(
    served, trained, ray_dashboard, registry_env
):
    url, (champion, _) = served
    registry = MlflowClient(trained.mlflow_uri)
    if PREVIOUS_ALIAS in registry.get_registered_model(MODEL).aliases:  # a test before promoted
        registry.delete_registered_model_alias(MODEL, PREVIOUS_ALIAS)
    with pytest.raises(DeployError, match=r"challengers\.classifier\.share: .* 0 to 1, got 1\.5"):
        set_challenger(ray_dashboard, "classifier", {"mode": "canary", "share": 1.5}, app_name=APP)
    with pytest.raises(DeployError, match=r"no alias 'nope' on lifecycle-test-classifier"):
        set_challenger(ray_dashboard, "classifier", {"mode": "canary"}, alias="nope", app_name=APP)
    with pytest.raises(DeployError, match="the champion's own version"):
        set_challenger(
            ray_dashboard, "classifier", {"mode": "shadow"}, alias="champion", app_name=APP
        )
    with pytest.raises(DeployError, match="classifier has no challenger"):
        promote(ray_dashboard, url, "classifier", PromotionPolicy(), app_name=APP)
    with pytest.raises(DeployError, match="nothing to roll back to"):
        rollback(ray_dashboard, url, "classifier", app_name=APP)
    with pytest.raises(
        DeployError, match=r"drift\.window: expected a whole number from 10 to 100,000, got 0"
    ):
        set_drift(ray_dashboard, {"window": 0}, APP)
    # A setting that reaches the replicas unchecked (written into the config by hand) is
    # refused there, named in /v1/models; the champion serves on.
    details, apps = declared_app(ray_dashboard, APP)
    config = user_config(apps[APP])
    config["challengers"] = {"classifier": {"source": f"models:/{MODEL}/2", "share": 2}}
    config["drift"] = {"window": 0}
    apply_apps(ray_dashboard, apps, details)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listing = httpx.get(f"{url}/v1/models").json()
        if listing["challenger_config_error"] and listing["drift_config_error"]:
            break
        time.sleep(0.5)
    assert "challengers.classifier.share" in listing["challenger_config_error"]
    assert "drift.window" in listing["drift_config_error"]
    assert listing["models"][0]["challenger"] is None
    assert listing["models"][0]["drift"]["window"] == 1000  # the setting before holds
    assert models_of(url, body(trained), 40) == [f"{MODEL}/{champion}"] * 40
    config["challengers"] = {}
    del config["drift"]
    apply_apps(ray_dashboard, apps, details)
    deadline = time.monotonic() + 60  # the good blocks taken: no refusal left
    while any(
        httpx.get(f"{url}/v1/models").json()[key]
        for key in ("challenger_config_error", "drift_config_error")
    ):
        assert time.monotonic() < deadline, "the replicas kept the refused block"
        time.sleep(0.2)


def test_canary_shadow_promote_and_rollback_under_load_fail_no_request(
    served, trained, ray_dashboard, registry_env
):
    url, (champion, challenger) = served
    payload = body(trained)
    with SteadyLoad(url, payload, rate=100) as load:
        config = set_challenger(
            ray_dashboard, "classifier", {"mode": "canary", "share": 0.2}, app_name=APP
        )
        assert config.source == f"models:/{MODEL}/{challenger}"  # the alias, pinned
        wait_for_challenger(url, "classifier", config)
        answers = models_of(url, payload, 5000)  # "NAME/VERSION" of each, None: failed
        share = answers.count(f"{MODEL}/{challenger}") / len(answers)
        assert abs(share - 0.2) <= 0.02, share
        assert None not in answers

        config = set_challenger(ray_dashboard, "classifier", {"mode": "shadow"}, app_name=APP)
        wait_for_challenger(url, "classifier", config)
        answers = models_of(url, payload, 400)
        assert set(answers) == {f"{MODEL}/{champion}"}  # the champion answers
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            shadow = slot_entry(url, "classifier")["challenger"]["shadow"]
            if shadow["requests"] >= 300:
                break
            time.sleep(0.5)
        assert shadow["requests"] >= 300 and shadow["agreement"] == 1.0  # the same weights

        checks, version = promote(
            ray_dashboard, url, "classifier", PromotionPolicy(min_shadowed=300), app_name=APP
        )
        assert version == challenger, [c.line() for c in checks]
        assert [c.name for c in checks] == ["parity", "held-out test_accuracy", "shadow agreement"]
        wait_for_challenger(url, "classifier", None)  # dropped with the promotion
        assert slot_entry(url, "classifier")["version"] == challenger
        time.sleep(1.0)

        checks, version = rollback(ray_dashboard, url, "classifier", app_name=APP)
        assert version == champion and checks[0].passed
        assert slot_entry(url, "classifier")["version"] == champion
        time.sleep(1.0)

    statuses = [status for status, _ in load.answers]
    assert statuses.count(200) == len(statuses), [a for a in load.answers if a[0] != 200][:5]
    versions = [version for _, version in load.answers]
    assert versions[0] == champion and versions[-1] == champion
    assert challenger in versions  # canary answers and the promoted stretch


def test_a_promotion_whose_checks_fail_moves_nothing(served, trained, ray_dashboard, registry_env):
    url, (champion, challenger) = served
    config = set_challenger(
        ray_dashboard, "classifier", {"mode": "canary", "share": 0.1}, app_name=APP
    )
    wait_for_challenger(url, "classifier", config)
    checks, version = promote(ray_dashboard, url, "classifier", PromotionPolicy(), app_name=APP)
    assert version is None
    failed = [c for c in checks if not c.passed]
    assert [c.name for c in failed] == ["shadow agreement"]  # never shadowed
    assert "at least 100 needed" in failed[0].detail
    assert slot_entry(url, "classifier")["version"] == champion
    set_challenger(ray_dashboard, "classifier", {"mode": "off"}, app_name=APP)


def listing_until(url: str, predicate, timeout_s: float = 60) -> dict:
    """GET /v1/models until `predicate(listing)` holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        listing = httpx.get(f"{url}/v1/models").json()
        if predicate(listing):
            return listing
        assert time.monotonic() < deadline, listing
        time.sleep(0.2)


def test_capture_keeps_answers_in_files_and_a_bad_directory_changes_nothing(
    served, trained, ray_dashboard, tmp_path
):
    url, (champion, _) = served
    directory = tmp_path / "captures"
    set_capture(ray_dashboard, {"rate": 1.0, "directory": str(directory)}, APP)
    listing_until(url, lambda m: (m["capture"] or {}).get("directory") == str(directory))
    assert models_of(url, body(trained), 100) == [f"{MODEL}/{champion}"] * 100
    listing_until(url, lambda m: m["capture"]["written"] >= 100)
    kept = [json.loads(line) for path in directory.glob("*.jsonl") for line in path.open()]
    assert len(kept) == 100 and {r["version"] for r in kept} == {champion}
    assert kept[0]["body"] == body(trained) and len(kept[0]["answer"]["predictions"]) == 2

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    set_capture(ray_dashboard, {"directory": str(blocker / "captures")}, APP)
    listing = listing_until(url, lambda m: m["capture_error"] is not None)
    assert "capture.directory: cannot write" in listing["capture_error"]
    assert listing["capture"]["directory"] == str(directory)  # the one before holds
    assert models_of(url, body(trained), 20) == [f"{MODEL}/{champion}"] * 20
    with pytest.raises(DeployError, match=r"capture\.rate: expected a number from 0 to 1"):
        set_capture(ray_dashboard, {"rate": 7}, APP)
    set_capture(ray_dashboard, None, APP)
    listing_until(url, lambda m: m["capture"] is None and m["capture_error"] is None)


def test_held_out_digits_raise_no_drift_alarm_and_inverted_ones_raise_it_within_500(
    served, trained, ray_dashboard
):
    # 5,000 requests of held-out test digits from a fresh window: no alarm; then, after a
    # window of them, inverted digits: the alarm within 500 requests. Over HTTP, one digit
    # a request, against the reference the real export stage wrote.
    url, _ = served
    held_out, shifts = digit_streams(str(trained.prepared), 5000, shifted=600)
    result = drift_trial(
        ray_dashboard, url, "classifier", "/v1/classify", held_out, shifts, app_name=APP
    )
    assert result["failed"] == 0
    assert result["false_alarms"] == 0 and result["alarm_checks"] > 400
    assert all(delay is not None and delay <= 500 for delay in result["delays"].values())
    gauges = httpx.get(f"{url}/v1/models").json()["models"][0]["drift"]
    assert gauges["alarm"] and gauges["features"] == 64
