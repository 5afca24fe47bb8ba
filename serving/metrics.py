"""Prometheus metrics of the serving app, through Ray's metrics API.

Each replica records into `ray.util.metrics`; Ray's agent on every node exports them with
Ray's own metrics (names prefixed `ray_`) on the node's metrics export port, the target
Prometheus scrapes on a Ray cluster (`ray start --metrics-export-port=8080`; Ray also
writes a service-discovery file, /tmp/ray/prom_metrics_service_discovery.json). Ray adds
the replica's identity to each series, so several replicas behind one port stay apart.

- dlpipe_requests_total{route, code, model, version}: answers by HTTP status (errors by
  code are the series whose code is not 200);
- dlpipe_request_seconds{route, model}: latency histogram, from the request's arrival to
  its answer, of a uniform sample of at most LATENCY_SAMPLES requests per second per
  replica, route and model (all of them below that rate). Within a second its quantiles
  are the requests'; over a longer window a busy second counts no more than a quiet one
  (a burst's tail is under-weighted), and `_count` is the sample's size: count requests
  with dlpipe_requests_total. Exact bucket counts summed in the replica would fix both;
  Ray's API has no way to add n observations to a bucket in one call;
- dlpipe_batch_size{model}: requests run together per onnxruntime call (dynamic batching);
- dlpipe_model_version{slot, model}: the registry version each slot serves;
- dlpipe_failed_reloads_total{slot}: versions refused (hash, parity sample, load error);
- dlpipe_drift{slot, feature}: each drift feature's PSI over the replica's window, and
  `embedding_distance` for text (serving/drift.py); dlpipe_drift_alarm{slot}: 1 while up.
  Set every DRIFT_EVERY_S while requests come.

Recording through Ray costs ~4-5 us per call on this machine, about a tenth of a request's
whole cost in the replica at 10,000 requests/s (py-spy, benchmarks/README.md). So request
counts are summed in the replica and handed to Ray once per FLUSH_S (one call per
route/code/version seen), and latencies are sampled (reservoir sampling, Vitter's
algorithm R) and handed over at the same time.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from collections.abc import Callable
from typing import Any

from serving.contracts import served_name

FLUSH_S = 1.0
DRIFT_EVERY_S = 5.0
LATENCY_SAMPLES = 128
"""Latencies recorded per FLUSH_S, route and model at most (a uniform sample beyond)."""

LATENCY_BUCKETS_S = [0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class ServingMetrics:
    """The app's metrics; create one per replica (Ray registers them on creation)."""

    def __init__(self, drift: Callable[[], dict[str, dict[str, float]]] | None = None) -> None:
        """`drift`: slot -> feature -> value, read for the drift gauges (model_slots.py)."""
        from ray.util.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            "dlpipe_requests_total",
            "HTTP answers of the dlpipe app, by route, status code and model version.",
            tag_keys=("route", "code", "model", "version"),
        )
        self.latency = Histogram(
            "dlpipe_request_seconds",
            "Time from a request's arrival to its answer.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=("route", "model"),
        )
        self.batch_size = Histogram(
            "dlpipe_batch_size",
            "Requests answered by one onnxruntime call (dynamic batching).",
            boundaries=BATCH_BUCKETS,
            tag_keys=("model",),
        )
        self.model_version = Gauge(
            "dlpipe_model_version",
            "Registry version served per model slot (0: a local folder).",
            tag_keys=("slot", "model"),
        )
        self.failed_reloads = Counter(
            "dlpipe_failed_reloads_total",
            "Model versions refused on reload (the old one kept serving).",
            tag_keys=("slot",),
        )
        self.drift = Gauge(
            "dlpipe_drift",
            "Input drift per model slot and drift feature: PSI against the export's "
            "reference over the replica's window (embedding_distance: Mahalanobis).",
            tag_keys=("slot", "feature"),
        )
        self.drift_alarm = Gauge(
            "dlpipe_drift_alarm",
            "1 while a drift feature's PSI is over the alarm level, else 0.",
            tag_keys=("slot",),
        )
        self._drift_source = drift
        self._drift_at = 0.0
        self._drift_series: set[tuple[str, str]] = set()
        self._unflushed: collections.Counter[tuple[str, int, str, str]] = collections.Counter()
        self._latencies: dict[tuple[str, str], Reservoir] = {}
        self._flush_scheduled = False

    def request(self, route: str, code: int, predictor: Any, seconds: float) -> None:
        model, version = _model_tags(predictor)
        self._unflushed[route, code, model, version] += 1
        sample = self._latencies.get((route, model))
        if sample is None:
            sample = self._latencies[route, model] = Reservoir(LATENCY_SAMPLES)
        sample.add(seconds)
        if not self._flush_scheduled:
            try:
                asyncio.get_running_loop().call_later(FLUSH_S, self.flush)
                self._flush_scheduled = True
            except RuntimeError:  # no event loop (a plain call): record now
                self.flush()

    def flush(self) -> None:
        """Hand the request counts and the latency sample since the last flush to Ray."""
        self._flush_scheduled = False
        counts, self._unflushed = self._unflushed, collections.Counter()
        for (route, code, model, version), count in counts.items():
            self.requests.inc(
                count, {"route": route, "code": str(code), "model": model, "version": version}
            )
        latencies, self._latencies = self._latencies, {}
        for (route, model), sample in latencies.items():
            tags = {"route": route, "model": model}
            for seconds in sample.kept:
                self.latency.observe(seconds, tags)
        if self._drift_source is not None and time.monotonic() - self._drift_at >= DRIFT_EVERY_S:
            self._drift_at = time.monotonic()
            self.drift_figures(self._drift_source())

    def drift_figures(self, figures: dict[str, dict[str, Any]]) -> None:
        """slot -> {feature: value, ..., "alarm": bool} -> the drift gauges. A series set
        before and missing now (watching off, a new model, a window not yet full) is set
        to 0, so that no alarm stays up on a dashboard."""
        published = {(slot, feature) for slot, values in figures.items() for feature in values}
        for slot, feature in self._drift_series - published:
            if feature == "alarm":
                self.drift_alarm.set(0.0, {"slot": slot})
            else:
                self.drift.set(0.0, {"slot": slot, "feature": feature})
        self._drift_series = published
        for slot, values in figures.items():
            for feature, value in values.items():
                if feature == "alarm":
                    self.drift_alarm.set(float(value), {"slot": slot})
                else:
                    self.drift.set(value, {"slot": slot, "feature": feature})

    def batch(self, predictor: Any, size: int) -> None:
        self.batch_size.observe(size, {"model": _model_tags(predictor)[0]})

    def models(self, loaded: Any, failed_slots: list[str]) -> None:
        """After a (re)load: the versions served, and the slots whose new version failed."""
        for slot, predictor in loaded.served():
            model, version = _model_tags(predictor)
            self.model_version.set(
                float(version) if version.isdigit() else 0.0, {"slot": slot, "model": model}
            )
        for slot in failed_slots:
            self.failed_reloads.inc(1, {"slot": slot})


class Reservoir:
    """A uniform random sample of at most `size` of the values added (Vitter's algorithm R):
    every value added has the same chance, size / seen, of being in `kept`."""

    def __init__(self, size: int, rng: random.Random | None = None) -> None:
        self.size = size
        self.seen = 0
        self.kept: list[float] = []
        self._random = rng or random.Random()

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.kept) < self.size:
            self.kept.append(value)
            return
        slot = self._random.randrange(self.seen)
        if slot < self.size:
            self.kept[slot] = value


def _model_tags(predictor: Any) -> tuple[str, str]:
    if predictor is None:
        return "none", "none"
    return served_name(predictor), predictor.files.version or "local"
