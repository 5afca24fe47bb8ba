"""The Ray Serve application: every model the pipeline exports, behind one HTTP API.

Deploy it with `dlpipe serve`, `serve run serving/config.yaml` / `serve deploy
serving/config.yaml`, or as a KubeRay RayService (the same file is its `serveConfigV2`).
Endpoints (serving/http_api.py): POST /v1/classify, /v1/fill-mask, /v1/embed, /v1/segment;
GET /v1/models, /healthz, /readyz, /openapi.json. A model left out ("none") answers 404.

Serve runs the replicas: placement, CPUs/GPUs, health checks, scaling, live settings
(`reconfigure`). Each replica answers HTTP on its own server (serving/http_server.py) on
`http_port` of its node, so Serve's proxy is off (`proxy_location: Disabled`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import ray
from ray import serve
from starlette.applications import Starlette

from serving.http_api import HttpApi, Limits
from serving.http_server import ReplicaHttpServer
from serving.mlm_predictor import MaskedLmPredictor
from serving.model_source import resolve_model
from serving.openapi import openapi_document
from serving.predictor import ClassifierPredictor, InputError
from serving.segment_predictor import SegmentPredictor

DEFAULT_MODEL = "models:/dlpipe-classifier@champion"
DEFAULT_MLM_MODEL = "models:/dlpipe-mlm@champion"
DEFAULT_SEGMENT_MODEL = "models:/dlpipe-segment@champion"
NO_MODEL = "none"
DEFAULT_HTTP_PORT = 8000


@dataclass(frozen=True)
class Batching:
    """Dynamic batching of /v1/classify (Serve's `@serve.batch`), changeable live through
    the deployment's `user_config`."""

    max_batch_size: int = 32
    """Requests run through onnxruntime together at most."""
    batch_wait_timeout_s: float = 0.0
    """How long the first request of a batch waits for others. 0: no waiting, a batch is
    whatever queued while the previous one ran; under load that fills batches by itself
    (measured: benchmarks/README.md), and a lone client pays no delay."""

    @classmethod
    def from_user_config(cls, config: dict[str, Any] | None) -> Batching:
        config = dict(config or {})
        known = {f.name for f in fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise ValueError(
                f"user_config: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        batching = cls(**config)
        if batching.max_batch_size < 1 or batching.batch_wait_timeout_s < 0:
            raise ValueError(f"user_config: {batching} (need max_batch_size >= 1, wait >= 0)")
        return batching


@dataclass
class LoadedModels:
    classifier: ClassifierPredictor | None = None
    mlm: MaskedLmPredictor | None = None
    segmenter: SegmentPredictor | None = None

    def infos(self) -> list[dict[str, Any]]:
        return [p.info() for p in (self.classifier, self.mlm, self.segmenter) if p is not None]


@serve.deployment(
    name="dlpipe",
    num_replicas=1,
    # Requests reach the replicas' own servers, not Serve's router: admission control is
    # http.max_in_flight (503 beyond it). These only bound Serve's own calls (health, config).
    max_ongoing_requests=64,
    health_check_period_s=5,
)
class PredictionService:
    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        tracking_uri: str | None = None,
        threads: int = 1,
        mlm_model: str = NO_MODEL,
        segment_model: str = NO_MODEL,
        http: dict[str, Any] | None = None,
    ) -> None:
        http = dict(http or {})
        host = http.pop("host", "127.0.0.1")
        port = int(http.pop("port", DEFAULT_HTTP_PORT))
        limits = Limits(**http)
        # CUDA only with a GPU Ray reserved for this replica (`num_gpus`), never a neighbour's.
        use_gpu = bool(ray.get_gpu_ids())
        self.models = LoadedModels()
        if model != NO_MODEL:
            self.models.classifier = ClassifierPredictor(
                resolve_model(model, tracking_uri), threads=threads, use_gpu=use_gpu
            )
        if mlm_model != NO_MODEL:
            self.models.mlm = MaskedLmPredictor(
                resolve_model(mlm_model, tracking_uri), threads=threads, use_gpu=use_gpu
            )
        if segment_model != NO_MODEL:
            self.models.segmenter = SegmentPredictor(
                resolve_model(segment_model, tracking_uri), threads=threads, use_gpu=use_gpu
            )
        api = HttpApi(self.models, limits, self.classify_batched, openapi_document)
        self.server = ReplicaHttpServer(Starlette(routes=api.routes()), host, port)
        self.server.start()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this at start and whenever `user_config` changes (no restart)."""
        batching = Batching.from_user_config(user_config)
        self._batch_many.set_max_batch_size(batching.max_batch_size)
        self._batch_many.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)

    def check_health(self) -> None:
        self.server.check()

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.stop()

    async def classify_batched(self, batch: np.ndarray) -> list[dict[str, Any]]:
        result = await self._batch_many(batch)
        if isinstance(result, InputError):
            raise result
        return result

    @serve.batch(
        max_batch_size=Batching.max_batch_size, batch_wait_timeout_s=Batching.batch_wait_timeout_s
    )
    async def _batch_many(self, batches: list[np.ndarray]) -> list[Any]:
        # Concurrent requests' inputs in one onnxruntime call; each gets its own answer.
        return self.models.classifier.classify_many(batches)


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run serving.app:build_app model=... mlm_model=...
    tracking_uri=... http_port=...` (`none` leaves a model out); serving/config.yaml sets
    the same arguments.

    `threads` sets onnxruntime's threads and the CPUs reserved per replica; `num_gpus`
    (default 0) reserves GPUs per replica, and only then does onnxruntime use CUDA. `http`
    (a mapping) sets host, port and the limits of serving/http_api.py `Limits`.
    """
    threads = int(args.get("threads", 1))
    actor_options = {"num_cpus": threads, "num_gpus": float(args.get("num_gpus", 0))}
    http = dict(args.get("http") or {})
    for key in ("host", "port"):  # flat forms for `serve run ... http_port=8080`
        if f"http_{key}" in args:
            http[key] = args[f"http_{key}"]
    return PredictionService.options(ray_actor_options=actor_options).bind(
        args.get("model", DEFAULT_MODEL),
        args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI"),
        threads,
        args.get("mlm_model", NO_MODEL),
        args.get("segment_model", NO_MODEL),
        http,
    )
