"""The Ray Serve application: every model the pipeline exports, behind one HTTP API.

Deploy it with `dlpipe serve`, `serve run serving/config.yaml` / `serve deploy
serving/config.yaml`, or as a KubeRay RayService (the same file is its `serveConfigV2`).
Endpoints: each model kind's (serving/kinds.py: POST /v1/classify, /v1/fill-mask, /v1/embed,
/v1/segment) and GET /v1/models, /healthz, /readyz, /openapi.json. A model left out
("none") answers 404.

Serve runs the replicas: placement, CPUs/GPUs, health checks, scaling, live settings
(`reconfigure`). Each replica answers HTTP on its own server (serving/http_server.py) on
`http_port` of its node, so Serve's proxy is off (`proxy_location: Disabled`).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import ray
from ray import serve

from serving.auth import KeyCheck, configured_key_hashes, listen_host
from serving.autoscaling import IN_FLIGHT
from serving.batcher import Batching, DynamicBatcher
from serving.capture import CaptureConfig, CaptureConfigError, RequestCapture
from serving.drift import DriftConfig, DriftConfigError
from serving.http_api import HttpApi, Limits
from serving.http_server import ReplicaHttpServer
from serving.kinds import BY_SLOT, KINDS, Batch
from serving.lifecycle import ChallengerConfigError, parse_challengers
from serving.metrics import ServingMetrics
from serving.model_slots import LoadedModels
from serving.openapi import openapi_document

DEFAULT_HTTP_PORT = 8000

log = logging.getLogger(__name__)


def pinned_versions(config: Any) -> dict[str, str]:
    """`user_config.versions`: slot -> registry version, written by `dlpipe serve reload`."""
    if config is None:
        return {}
    if not isinstance(config, dict) or not set(config) <= set(BY_SLOT):
        raise ValueError(
            f"user_config.versions: expected a mapping of {sorted(BY_SLOT)} to registry "
            f"versions, got {config!r}"
        )
    return {slot: str(version) for slot, version in config.items()}


@serve.deployment(
    name="dlpipe",
    # Requests reach the replicas' own servers, not Serve's router: admission control is
    # http.max_in_flight (503 beyond it). These only bound Serve's own calls (health, config).
    max_ongoing_requests=64,
    health_check_period_s=5,
)
class PredictionService:
    def __init__(
        self,
        sources: dict[str, str],
        tracking_uri: str | None = None,
        threads: int = 1,
        http: dict[str, Any] | None = None,
    ) -> None:
        """`sources`: slot -> the model to serve (registry URI, folder, or none)."""
        http = dict(http or {})
        self.keys = KeyCheck(http.pop("api_keys", None) or {})
        self.host, why = listen_host(
            http.pop("host", "127.0.0.1"),
            self.keys.enabled,
            bool(http.pop("allow_unauthenticated", False)),
        )
        log.warning("%s", why)  # said once per replica, at start, in its log
        self.port = int(http.pop("port", DEFAULT_HTTP_PORT))
        self.limits = Limits(**http)
        self.sources = sources
        self.tracking_uri = tracking_uri
        self.threads = threads
        # CUDA only with a GPU Ray reserved for this replica (`num_gpus`), never a neighbour's.
        self.use_gpu = bool(ray.get_gpu_ids())
        self.models = LoadedModels()
        self.metrics = ServingMetrics(drift=self.models.drift_gauges)
        self.batchers = route_batchers(self.metrics, self.limits.request_timeout_s)
        self.api: HttpApi | None = None
        self.server: ReplicaHttpServer | None = None

    def reconfigure(self, user_config: dict[str, Any] | None, rank: Any = None) -> None:
        """Serve calls this once the replica is built and whenever `user_config` changes,
        on every replica, without restarting it (taking `rank` makes Serve call it even
        when there is no user_config). Loads or swaps the models, then starts answering."""
        config = dict(user_config or {})
        versions = pinned_versions(config.pop("versions", None))
        challengers = config.pop("challengers", None)
        capture = config.pop("capture", None)
        drift = config.pop("drift", None)
        batching = Batching.from_user_config(config)
        for batcher in self.batchers.values():
            batcher.configure(batching.max_batch_size, batching.batch_wait_timeout_s)
        refused = self.models.load(
            self.sources, versions, self.tracking_uri, self.threads, self.use_gpu
        )
        try:
            shadowable = {kind.slot: kind.can_shadow for kind in KINDS}
            configs = parse_challengers(challengers, shadowable)
        except ChallengerConfigError as exc:
            # Refused here, not raised: the champions and the challengers as they were go
            # on serving (dlpipe serve challenger checks the same before it asks).
            log.error("user_config: %s; the challengers stay as they were", exc)
            self.models.challenger_config_error = str(exc)
        else:
            self.models.load_challengers(configs, self.tracking_uri, self.threads, self.use_gpu)
        self._configure_drift(drift)
        self.metrics.models(self.models, refused)
        freeze_heap()
        if self.server is None:
            self.api = HttpApi(
                self.models,
                self.limits,
                batched_calls(self.batchers),
                lambda: openapi_document(self.models),
                self.metrics,
                replica=serve.get_replica_context().replica_id.unique_id,
                keys=self.keys,
            )
            self.server = ReplicaHttpServer(self.api, self.host, self.port)
            self.server.start()
        self._configure_capture(capture)

    def _configure_capture(self, raw: Any) -> None:
        """Start, change or stop request capture as `user_config.capture` says; a setting
        that cannot be used is refused (named in /v1/models), the one before holding."""
        try:
            config = CaptureConfig.parse(raw) if raw is not None else None
            current = self.api.capture
            if (current.config if current is not None else None) == config:
                self.api.capture_error = None
                return
            replica = serve.get_replica_context().replica_id.unique_id
            started = RequestCapture(config, replica) if config is not None else None
        except CaptureConfigError as exc:
            log.error("user_config: %s; capture stays as it was", exc)
            self.api.capture_error = str(exc)
            return
        self.api.capture, self.api.capture_error = started, None
        if current is not None:
            current.close()  # what it queued is written first

    def _configure_drift(self, raw: Any) -> None:
        """`user_config.drift` (serving/drift.py); a refused setting is named in
        /v1/models and the one before it holds."""
        try:
            config = DriftConfig.parse(raw) if raw is not None else DriftConfig()
        except DriftConfigError as exc:
            log.error("user_config: %s; drift monitoring stays as it was", exc)
            self.models.drift_config_error = str(exc)
            return
        self.models.configure_drift(config)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve asks every few seconds; serving/autoscaling.py scales on it (Serve's own
        request counts miss the requests this replica's server takes)."""
        return {IN_FLIGHT: float(self.api.in_flight if self.api is not None else 0)}

    def check_health(self) -> None:
        if self.server is not None:
            self.server.check()

    def __del__(self) -> None:
        """Serve's graceful stop (scale-down, redeploy, shutdown) ends here, before the
        process is killed: drain, then close (see Limits.drain_s)."""
        server = getattr(self, "server", None)
        if server is not None:
            if self.api is not None and self.limits.drain_s > 0:
                server.stop_listening()
                self.api.draining = True
                time.sleep(self.limits.drain_s)
            server.stop()
            # The counts of the last second: their timer went with the server's loop.
            self.metrics.flush()
            if self.api is not None and self.api.capture is not None:
                self.api.capture.close()


Batcher = DynamicBatcher[tuple[Any, Any], Any]
"""A route's batcher: items are (predictor, one request's model input)."""


def route_batchers(metrics: ServingMetrics, timeout_s: float) -> dict[str, Batcher]:
    """One batcher per route that answers several requests in one model call (a `many`),
    by path; a request still queued `timeout_s` after it came is refused (a 504)."""
    return {
        route.path: DynamicBatcher(partial(run_together, route.many, metrics), timeout_s=timeout_s)
        for kind in KINDS
        for route in kind.routes
        if route.many is not None
    }


def batched_calls(batchers: dict[str, Batcher]) -> dict[str, Batch]:
    """path -> the route's batched call, as serving/http_api.py's HttpApi takes them."""

    def call_of(batcher: Batcher) -> Batch:
        async def call(predictor: Any, inputs: Any) -> Any:
            return await batcher.submit((predictor, inputs), len(inputs))

        return call

    return {path: call_of(batcher) for path, batcher in batchers.items()}


def run_together(
    many: Callable[[Any, list[Any]], list[Any]],
    metrics: ServingMetrics,
    requests: list[tuple[Any, Any]],
) -> list[Any]:
    """Concurrent requests' inputs in one onnxruntime call per model (`many`, a route's:
    kinds.py); each gets its own answer, in the order asked. A batch holds requests for
    two models during a swap, and interleaved ones all the time under a canary."""
    by_model: dict[int, list[int]] = {}
    for index, (predictor, _) in enumerate(requests):
        by_model.setdefault(id(predictor), []).append(index)
    results: list[Any] = [None] * len(requests)
    for indices in by_model.values():
        predictor = requests[indices[0]][0]
        metrics.batch(predictor, len(indices))
        answers = many(predictor, [requests[i][1] for i in indices])
        for index, answer in zip(indices, answers, strict=True):
            results[index] = answer
    return results


def freeze_heap() -> None:
    """Move what the replica holds now (Ray, onnxruntime, pydantic, the models) out of the
    garbage collector's sight: a full collection under load then scans only what requests
    allocate, not the whole heap (a p99 pause). Redone after every (re)load, unfrozen
    first, so that a swapped-out model is collected and the new one frozen (the one-off
    collection pauses requests for a moment, at reload only)."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run serving.app:build_app model=... mlm_model=...
    tracking_uri=... http_port=...` (`none` leaves a model out); serving/config.yaml sets
    the same arguments.

    `threads` sets onnxruntime's threads and the CPUs reserved per replica; `num_gpus` the
    GPU per replica (see `replica_gpus`; onnxruntime uses CUDA only with one). `http` (a
    mapping) sets host, port, the limits of serving/http_api.py `Limits`,
    `allow_unauthenticated`, and `api_keys` (name -> sha256, serving/auth.py); without
    `api_keys` the keys come from this process's environment (DLPIPE_API_KEYS,
    DLPIPE_API_KEYS_FILE), e.g. a RayService's Secret.
    """
    threads = int(args.get("threads", 1))
    gpus = replica_gpus(args.get("num_gpus", "auto"), args.get("max_replicas"))
    actor_options = {"num_cpus": threads, "num_gpus": gpus}
    http = dict(args.get("http") or {})
    for key in ("host", "port"):  # flat forms for `serve run ... http_port=8080`
        if f"http_{key}" in args:
            http[key] = args[f"http_{key}"]
    if "api_keys" not in http:  # hashes only travel in the config (serving/auth.py)
        http["api_keys"] = configured_key_hashes()
    sources = {kind.slot: str(args.get(kind.source_arg, kind.app_default)) for kind in KINDS}
    return PredictionService.options(ray_actor_options=actor_options).bind(
        sources,
        args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI"),
        threads,
        http,
    )


def replica_gpus(setting: Any, max_replicas: Any = None) -> float:
    """The GPU each replica reserves for the app arg `num_gpus` = `setting`:

    - "auto" (the default): none on a cluster without GPUs; otherwise a share sized so that
      `max_replicas` replicas (default: serving/config.yaml's autoscaling maximum) fit on
      the cluster's GPUs at once, e.g. 0.25 each for 4 replicas on one GPU;
    - a number: that many (0: CPU only). More than 0 on a cluster without GPUs is an error
      naming `num_gpus`, unless this process joined a cluster that may still add GPU nodes.

    Connects to Ray unless `setting` is 0 (the cluster's GPUs decide): `serve run` then
    uses that connection."""
    from pipelines.stagekit.errors import UserError
    from pipelines.training.cluster import (
        cluster_gpus,
        connect_ray,
        joined_cluster,
        place_workers,
    )

    if setting == "auto":
        connect_ray()
        replicas = int(max_replicas or _default_max_replicas())
        return place_workers("auto", 1, "num_gpus", replicas).gpus_per_worker
    try:
        gpus = float(setting)
    except (TypeError, ValueError):
        raise UserError(f"num_gpus: expected auto or a number, got {setting!r}") from None
    if gpus < 0:
        raise UserError(f"num_gpus: expected auto or a number >= 0, got {setting!r}")
    if gpus > 0:
        connect_ray()
        if cluster_gpus() == 0 and not joined_cluster():
            raise UserError(
                f"num_gpus: {setting}, but the Ray cluster has no GPU; set num_gpus: auto (a "
                "GPU share when the cluster has GPUs, else CPU) or 0"
            )
    return gpus


def _default_max_replicas() -> int:
    from serving.deploy import default_app

    for deployment in default_app().get("deployments", []):
        autoscaling = deployment.get("autoscaling_config") or {}
        if "max_replicas" in autoscaling:
            return int(autoscaling["max_replicas"])
    return 1
