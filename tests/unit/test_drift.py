"""Input drift (serving/drift.py): the reference an export writes, the PSI a replica's
window keeps against it, the alarm, the settings, and the drift /v1/models shows."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from serving.drift import (
    REFERENCE_FILE,
    DriftConfig,
    DriftConfigError,
    DriftMonitor,
    DriftReference,
    feature_names,
    image_rows,
    reference_statistics,
    sequence_rows,
)
from tests.unit.test_predictor import export_dir  # noqa: F401 (a fixture: the tiny export)


def customers(rng: np.random.Generator, n: int, spend_scale: float = 1.0) -> np.ndarray:
    """Customer-like records: purchases (counts), spend (log-normal), days since last."""
    purchases = rng.poisson(3, n) + 1
    spend = rng.lognormal(3.0, 1.0, n) * spend_scale
    recency = rng.uniform(0, 365, n)
    return np.stack([purchases, spend, recency], axis=1).astype(np.float32)


NAMES = ["frequency", "monetary_mean", "recency_days"]


def reference_of(rows: np.ndarray, layout: str = "values", names=NAMES) -> DriftReference:
    # Through JSON, as the export writes it and the replica reads it.
    return DriftReference.parse(json.loads(json.dumps(reference_statistics(layout, rows, names))))


def stream(monitor: DriftMonitor, rows: np.ndarray, stop_on_alarm: bool = False) -> int:
    """Observe `rows` one request each; returns how many were sent."""
    for i, row in enumerate(rows, 1):
        monitor.observe(row[None])
        if stop_on_alarm and monitor.alarm:
            return i
    return len(rows)


def test_held_out_customers_raise_no_alarm_and_scaled_spend_raises_it_within_500():
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(reference_of(customers(rng, 5000)), DriftConfig(window=500))
    stream(monitor, customers(rng, 5000))
    assert monitor.alarms == 0 and monitor.max_psi < 0.1
    assert monitor.status()["max_ks"] < 0.1  # KS too: the values layout keeps percentiles
    sent = stream(monitor, customers(rng, 2000, spend_scale=3.0), stop_on_alarm=True)
    assert monitor.alarm and sent <= 500
    status = monitor.status()
    assert next(iter(status["top_psi"])) == "monetary_mean"  # the feature that moved
    assert status["max_ks"] > 0.15  # at the alarm, part of the window has moved


def test_the_window_forgets_a_shift_once_it_is_over():
    rng = np.random.default_rng(1)
    monitor = DriftMonitor(reference_of(customers(rng, 5000)), DriftConfig(window=200))
    stream(monitor, customers(rng, 300, spend_scale=5.0))
    assert monitor.alarm
    stream(monitor, customers(rng, 400))
    assert not monitor.alarm and monitor.alarms == 1


def test_the_counts_kept_up_to_date_match_the_window_recounted():
    # Requests of several rows, some longer than the window: the eviction bookkeeping
    # must leave exactly the last `window` inputs counted.
    rng = np.random.default_rng(2)
    reference = reference_of(customers(rng, 1000))
    monitor = DriftMonitor(reference, DriftConfig(window=50, check_every=7))
    sent = []
    for size in [1, 3, 20, 60, 2, 49, 51, 5] * 3:
        batch = customers(rng, size, spend_scale=rng.uniform(0.5, 2))
        monitor.observe(batch)
        sent.append(batch)
    monitor.status()  # folds what is held
    last = np.concatenate(sent)[-50:]
    recounted = np.zeros_like(monitor._counts)
    for feature, bins in enumerate(reference.bin_of(last.astype(np.float64)).T):
        recounted[feature] = np.bincount(bins, minlength=recounted.shape[1])
    assert monitor.seen == sum(len(b) for b in sent) and monitor.filled == 50
    np.testing.assert_array_equal(monitor._counts, recounted)


def test_no_verdict_before_the_window_is_full():
    rng = np.random.default_rng(3)
    monitor = DriftMonitor(reference_of(customers(rng, 1000)), DriftConfig(window=100))
    stream(monitor, customers(rng, 99, spend_scale=10.0))
    assert not monitor.alarm
    stream(monitor, customers(rng, 10, spend_scale=10.0))
    assert monitor.alarm and monitor.alarm_at == 100


def test_pixels_that_never_lit_up_in_training_show_inverted_images():
    # A pixel always 0 in training has one bin, x <= 0, and one more beyond it.
    rng = np.random.default_rng(4)
    images = rng.uniform(0, 1, (1000, 1, 8, 8)).astype(np.float32)
    images[:, :, 0, :] = 0.0  # the top row is always dark
    names = feature_names("image_grid", [1, 8, 8], None)
    reference = reference_of(image_rows(images), "image_grid", names)
    monitor = DriftMonitor(reference, DriftConfig(window=100))
    monitor.observe(images[:100])
    assert not monitor.alarm
    monitor.observe(1.0 - images[:100])
    assert monitor.alarm and next(iter(monitor.status()["top_psi"])).startswith("pixel_0_")


def test_large_images_are_summarised_on_an_8_by_8_grid():
    image = np.arange(28 * 28, dtype=np.float32).reshape(1, 1, 28, 28)
    cells = image_rows(image)
    assert cells.shape == (1, 64)
    assert cells[0, 0] == pytest.approx(image[0, 0, :4, :4].mean())  # 28 = 4 x 4 + 4 x 3
    assert cells[0, 63] == pytest.approx(image[0, 0, -3:, -3:].mean())
    assert feature_names("image_grid", [1, 28, 28], None)[9] == "cell_1_1"
    assert feature_names("image_grid", [1, 8, 8], None)[9] == "pixel_1_1"


def test_sequence_features_ignore_the_padding():
    series = np.full((2, 5, 1), np.nan, dtype=np.float32)
    series[0, :3, 0] = [1.0, 2.0, 3.0]
    series[1, :5, 0] = 4.0
    rows = sequence_rows(series)  # (mean, std, length) per series
    np.testing.assert_allclose(rows, [[2.0, np.sqrt(2 / 3), 3.0], [4.0, 0.0, 5.0]], rtol=1e-6)
    assert feature_names("sequence_summary", [5, 1], ["heart"]) == [
        "heart_mean",
        "heart_std",
        "length",
    ]


def test_text_embeddings_that_move_are_seen_by_projection_and_distance():
    rng = np.random.default_rng(5)
    width = 16
    vectors = rng.normal(size=(3000, width))
    lengths = rng.poisson(12, (3000, 1)).astype(float)
    raw = reference_statistics("text", lengths, ["token_length"], vectors)
    reference = DriftReference.parse(json.loads(json.dumps(raw)))
    assert reference.names[-1] == "token_length" and len(reference.names) == 9
    monitor = DriftMonitor(reference, DriftConfig(window=300))
    live = rng.normal(size=(300, width))
    monitor.observe((live, rng.poisson(12, 300)))
    assert not monitor.alarm and monitor.embedding_distance() < 0.5
    monitor.observe((live + 1.0, rng.poisson(12, 300)))  # every axis moved one std
    assert monitor.alarm and monitor.embedding_distance() > 3.0
    assert "embedding_distance" in monitor.gauges()


@pytest.mark.parametrize(
    "raw, named",
    [
        ({"window": 0}, "drift.window"),
        ({"window": 2.5}, "drift.window"),
        ({"check_every": 0}, "drift.check_every"),
        ({"psi_alarm": 0}, "drift.psi_alarm"),
        ({"psi_alarm": "high"}, "drift.psi_alarm"),
        ({"enabled": "yes"}, "drift.enabled"),
        ({"windows": 10}, "unknown setting(s) windows"),
        ([500], "drift: expected a mapping"),
    ],
)
def test_bad_settings_are_refused_naming_the_setting(raw, named):
    with pytest.raises(DriftConfigError, match=named.replace("(", r"\(").replace(")", r"\)")):
        DriftConfig.parse(raw)


def test_the_app_watches_the_champion_and_lists_its_drift(export_dir, tmp_path):  # noqa: F811
    from starlette.testclient import TestClient

    from serving.http_api import HttpApi, Limits
    from serving.model_slots import LoadedModels
    from serving.model_source import resolve_model
    from serving.predictor import ClassifierPredictor

    rng = np.random.default_rng(6)
    plain = shutil.copytree(export_dir, tmp_path / "plain")
    watched = shutil.copytree(export_dir, tmp_path / "watched")
    dark = rng.uniform(0.0, 0.5, (500, 1, 4, 4)).astype(np.float32)
    names = feature_names("image_grid", [1, 4, 4], None)
    (watched / REFERENCE_FILE).write_text(
        json.dumps(reference_statistics("image_grid", image_rows(dark), names))
    )
    card = json.loads((watched / "model_card.json").read_text())
    (watched / "model_card.json").write_text(
        json.dumps({**card, "drift_reference": REFERENCE_FILE})
    )

    # An export made before drift references: served, its drift says why it is not watched.
    models = LoadedModels(classifier=ClassifierPredictor(resolve_model(str(plain))))
    listing = TestClient(HttpApi(models, Limits())).get("/v1/models").json()
    assert "no drift reference" in listing["models"][0]["drift"]["error"]

    models = LoadedModels(classifier=ClassifierPredictor(resolve_model(str(watched))))
    models.configure_drift(DriftConfig(window=200))
    http = TestClient(HttpApi(models, Limits()))
    assert models.drift_gauges() == {}  # no gauge before the window is full: chance alone
    for rows in rng.uniform(0.0, 0.5, (25, 10, 16)):
        assert http.post("/v1/classify", json={"instances": rows.tolist()}).status_code == 200
    drift = http.get("/v1/models").json()["models"][0]["drift"]
    assert drift["seen"] == 250 and drift["window"] == 200 and not drift["alarm"]
    bright = rng.uniform(0.6, 1.0, (100, 16)).tolist()
    assert http.post("/v1/classify", json={"instances": bright}).status_code == 200
    drift = http.get("/v1/models").json()["models"][0]["drift"]
    assert drift["alarm"] and drift["alarms"] == 1 and drift["max_psi"] > 0.5
    gauges = models.drift_gauges()["classifier"]
    assert gauges["alarm"] is True and len(gauges) == 17  # 16 pixels and the alarm


def test_on_a_loop_the_window_is_updated_once_per_turn_for_all_its_requests(
    export_dir,  # noqa: F811
):
    import asyncio

    from serving.model_slots import LoadedModels
    from serving.model_source import resolve_model
    from serving.predictor import ClassifierPredictor

    rng = np.random.default_rng(8)
    models = LoadedModels(classifier=ClassifierPredictor(resolve_model(str(export_dir))))
    rows = rng.uniform(0.0, 0.5, (1, 16))
    reference = reference_of(rows.repeat(50, axis=0), "values", [f"f{i}" for i in range(16)])
    predictor = models.get("classifier")
    monitor = DriftMonitor(reference, DriftConfig(window=100, check_every=10))
    models.monitors["classifier"] = (predictor, monitor)

    async def one_turn(requests: int) -> tuple[int, int]:
        for _ in range(requests):  # a batch's requests, answered in one turn of the loop
            models.observe("classifier", predictor, rows)
        held = monitor.seen
        await asyncio.sleep(0)  # the next turn: the update ran, once for all of them
        return held, monitor.seen

    assert asyncio.run(one_turn(32)) == (0, 32)
    assert asyncio.run(one_turn(5)) == (32, 32)  # fewer than check_every: held on
    # Outside a loop (a script): at once, as soon as check_every inputs are held.
    for _ in range(5):
        models.observe("classifier", predictor, rows)
    assert monitor.seen == 42

    # A monitor that replaces the due one before the update runs (new settings) is the
    # one updated.
    async def replaced() -> int:
        for _ in range(10):
            models.observe("classifier", predictor, rows)
        fresh = DriftMonitor(reference, DriftConfig(window=100, check_every=1))
        models.monitors["classifier"] = (predictor, fresh)
        models.observe("classifier", predictor, rows)  # due too; its slot's update is queued
        await asyncio.sleep(0)
        return fresh.seen

    assert asyncio.run(replaced()) == 1

    # An update that fails stops the watching, named, and never reaches a client.
    broken = DriftMonitor(reference, DriftConfig(window=100, check_every=1))
    broken._fold = None  # a bug: the update calls something that is not callable
    models.monitors["classifier"] = (predictor, broken)

    async def fails() -> None:
        models.observe("classifier", predictor, rows)
        await asyncio.sleep(0)

    asyncio.run(fails())
    assert "classifier" not in models.monitors
    assert "watching stopped" in models.drift_errors["classifier"]

    # A failure that meets a reconfigure replacing the monitor (Serve's thread): whichever
    # takes the lock first, what the reconfigure decided is what stays.
    import threading

    failing = DriftMonitor(reference, DriftConfig(window=100, check_every=1))
    failing._fold = None
    models.monitors["classifier"] = (predictor, failing)
    models.drift_errors.pop("classifier", None)
    failing.hold(rows)
    models._watching.acquire()  # both threads reach their lock while it is held
    threads = [
        threading.Thread(target=models._drift_step, args=("classifier", failing, failing.update)),
        threading.Thread(target=models.configure_drift, args=(DriftConfig(window=50),)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=0.2)
    assert all(thread.is_alive() for thread in threads)  # each waits for the lock
    models._watching.release()
    for thread in threads:
        thread.join(timeout=5)
        assert not thread.is_alive()
    # What the reconfigure decided stands (this export has no reference of its own: not
    # watched, saying why), not the failed monitor's "watching stopped".
    assert "classifier" not in models.monitors
    assert models.drift_errors["classifier"].startswith("its export has no drift reference")
