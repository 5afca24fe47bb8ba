"""The Ray Serve application: a thin FastAPI ingress over `ClassifierPredictor`.

Run it with `dlpipe serve`, or `serve run serving.app:build_app model=<source>`.
Endpoints: POST /v1/classify, GET /v1/models, GET /healthz (OpenAPI at /docs).
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations
# at runtime to know that `request` is the JSON body.
import os
from typing import Any

import ray
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve

from serving.model_source import resolve_model
from serving.predictor import ClassifierPredictor, InputError
from serving.schemas import ClassifyRequest, ClassifyResponse

DEFAULT_MODEL = "models:/dlpipe-classifier@champion"

api = FastAPI(
    title="dlpipe",
    description="Predictions from the models trained by the dlpipe pipeline.",
    version="0.1.0",
)


@api.exception_handler(RequestValidationError)
async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field. FastAPI's default echoes the offending input back, and
    cannot encode NaN or undecodable bytes: a client mistake would become a 500."""
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": errors})


@serve.deployment(
    name="classifier",
    num_replicas=1,
    # Serve's default of 5 in-flight requests per replica throttles concurrent clients.
    max_ongoing_requests=64,
)
@serve.ingress(api)
class ClassifierService:
    def __init__(self, model: str, tracking_uri: str | None = None, threads: int = 1) -> None:
        # CUDA only with a GPU Ray reserved for this replica (`num_gpus`), never a neighbour's.
        self.predictor = ClassifierPredictor(
            resolve_model(model, tracking_uri), threads=threads, use_gpu=bool(ray.get_gpu_ids())
        )

    @api.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    def models(self) -> dict[str, Any]:
        return {"models": [self.predictor.info()]}

    @api.post("/v1/classify", response_model=ClassifyResponse)
    def classify(self, request: ClassifyRequest) -> dict[str, Any]:
        try:
            if request.instances is not None:
                batch = self.predictor.features_to_array(request.instances)
            else:
                batch = self.predictor.images_to_array(request.images or [])
        except InputError as exc:
            # Same shape as FastAPI's own validation errors: the field is in `loc`.
            raise HTTPException(
                status_code=422,
                detail=[
                    {
                        "loc": ["body", *exc.field.replace("[", ".").rstrip("]").split(".")],
                        "msg": exc.message,
                        "type": "value_error",
                    }
                ],
            ) from None
        return {"model": self.predictor.card["name"], "predictions": self.predictor.classify(batch)}


def build_app(args: dict) -> serve.Application:
    """Application builder for `serve run serving.app:build_app model=... tracking_uri=...`.

    `threads` sets onnxruntime's threads and the CPUs reserved per replica; `num_gpus`
    (default 0) reserves GPUs per replica, and only then does onnxruntime use CUDA.
    """
    threads = int(args.get("threads", 1))
    actor_options = {"num_cpus": threads, "num_gpus": float(args.get("num_gpus", 0))}
    return ClassifierService.options(ray_actor_options=actor_options).bind(
        args.get("model", DEFAULT_MODEL),
        args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI"),
        threads,
    )
