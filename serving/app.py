"""The Ray Serve application: a thin FastAPI ingress over the ONNX Runtime predictors.

Run it with `dlpipe serve`, or `serve run serving.app:build_app model=<source>
mlm_model=<source> segment_model=<source>`. Endpoints: POST /v1/classify (the classifier),
POST /v1/fill-mask and /v1/embed (the masked-language model), POST /v1/segment (customer
segments), GET /v1/models, GET /healthz (OpenAPI at /docs). Any model may be left out
("none"); its endpoints then answer 404 saying so.
"""

# No `from __future__ import annotations` here: FastAPI reads the handlers' annotations
# at runtime to know that `request` is the JSON body.
import os
from typing import Any

import ray
from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.mlm_predictor import MaskedLmPredictor
from serving.model_source import resolve_model
from serving.predictor import ClassifierPredictor, InputError
from serving.schemas import (
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    FillMaskRequest,
    FillMaskResponse,
    SegmentRequest,
    SegmentResponse,
)
from serving.segment_predictor import SegmentPredictor

DEFAULT_MODEL = "models:/dlpipe-classifier@champion"
DEFAULT_MLM_MODEL = "models:/dlpipe-mlm@champion"
DEFAULT_SEGMENT_MODEL = "models:/dlpipe-segment@champion"
NO_MODEL = "none"

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


def input_error(exc: InputError) -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors: the field is in `loc`."""
    return HTTPException(
        status_code=422,
        detail=[
            {
                "loc": ["body", *exc.field.replace("[", ".").rstrip("]").split(".")],
                "msg": exc.message,
                "type": "value_error",
            }
        ],
    )


# What FastAPI says when the body cannot be decoded (e.g. not UTF-8): true, but no help.
_UNPARSEABLE_BODY = "There was an error parsing the body"


@api.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 400 and exc.detail == _UNPARSEABLE_BODY:
        return JSONResponse(
            status_code=400,
            content={"detail": "the request body is not valid JSON text: send UTF-8 encoded JSON"},
        )
    return await http_exception_handler(request, exc)


@serve.deployment(
    name="dlpipe",
    num_replicas=1,
    # Serve's default of 5 in-flight requests per replica throttles concurrent clients.
    max_ongoing_requests=64,
)
@serve.ingress(api)
class PredictionService:
    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        tracking_uri: str | None = None,
        threads: int = 1,
        mlm_model: str = NO_MODEL,
        segment_model: str = NO_MODEL,
    ) -> None:
        # CUDA only with a GPU Ray reserved for this replica (`num_gpus`), never a neighbour's.
        use_gpu = bool(ray.get_gpu_ids())
        self.classifier = self.mlm = self.segmenter = None
        if model != NO_MODEL:
            self.classifier = ClassifierPredictor(
                resolve_model(model, tracking_uri), threads=threads, use_gpu=use_gpu
            )
        if mlm_model != NO_MODEL:
            self.mlm = MaskedLmPredictor(
                resolve_model(mlm_model, tracking_uri), threads=threads, use_gpu=use_gpu
            )

        if segment_model != NO_MODEL:
            self.segmenter = SegmentPredictor(
                resolve_model(segment_model, tracking_uri), threads=threads, use_gpu=use_gpu
            )

    @api.get("/healthz")
    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    def models(self) -> dict[str, Any]:
        loaded = [p for p in (self.classifier, self.mlm, self.segmenter) if p is not None]
        return {"models": [p.info() for p in loaded]}

    @api.post("/v1/classify", response_model=ClassifyResponse)
    def classify(self, request: ClassifyRequest) -> dict[str, Any]:
        classifier = self._loaded(self.classifier, "classifier", "model")
        try:
            if request.instances is not None:
                batch = classifier.features_to_array(request.instances)
            else:
                batch = classifier.images_to_array(request.images or [])
            return {"model": classifier.card["name"], "predictions": classifier.classify(batch)}
        except InputError as exc:
            raise input_error(exc) from None

    @api.post("/v1/fill-mask", response_model=FillMaskResponse)
    def fill_mask(self, request: FillMaskRequest) -> dict[str, Any]:
        mlm = self._loaded(self.mlm, "masked-language model", "mlm_model")
        try:
            results = mlm.fill_mask(request.texts, request.top_k)
        except InputError as exc:
            raise input_error(exc) from None
        return {"model": mlm.card["name"], "results": results}

    @api.post("/v1/embed", response_model=EmbedResponse)
    def embed(self, request: EmbedRequest) -> dict[str, Any]:
        mlm = self._loaded(self.mlm, "masked-language model", "mlm_model")
        try:
            vectors, truncated = mlm.embed(request.texts)
        except InputError as exc:
            raise input_error(exc) from None
        return {"model": mlm.card["name"], "embeddings": vectors.tolist(), "truncated": truncated}

    @api.post("/v1/segment", response_model=SegmentResponse)
    def segment(self, request: SegmentRequest) -> dict[str, Any]:
        segmenter = self._loaded(self.segmenter, "segmentation model", "segment_model")
        try:
            batch = segmenter.records_to_array(request.customers)
        except InputError as exc:
            raise input_error(exc) from None
        return {"model": segmenter.card["name"], "assignments": segmenter.segment(batch)}

    @staticmethod
    def _loaded(predictor, kind: str, option: str):
        if predictor is None:
            raise HTTPException(
                status_code=404,
                detail=f"no {kind} is loaded in this app (start it with {option}=<source>)",
            )
        return predictor


def build_app(args: dict) -> serve.Application:
    """Application builder for `serve run serving.app:build_app model=... mlm_model=...
    tracking_uri=...` (`none` leaves a model out).

    `threads` sets onnxruntime's threads and the CPUs reserved per replica; `num_gpus`
    (default 0) reserves GPUs per replica, and only then does onnxruntime use CUDA.
    """
    threads = int(args.get("threads", 1))
    actor_options = {"num_cpus": threads, "num_gpus": float(args.get("num_gpus", 0))}
    return PredictionService.options(ray_actor_options=actor_options).bind(
        args.get("model", DEFAULT_MODEL),
        args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI"),
        threads,
        args.get("mlm_model", NO_MODEL),
        args.get("segment_model", NO_MODEL),
    )
