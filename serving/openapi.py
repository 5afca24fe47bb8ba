"""The OpenAPI document of the HTTP API, generated from the same pydantic models that
validate the requests (serving/schemas.py).

FastAPI builds the document; it never serves a request (see serving/http_api.py for why).
"""

from __future__ import annotations

import functools
from typing import Any

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

ERRORS = {
    400: "not UTF-8 JSON",
    404: "that model is not loaded in this app",
    413: "request body too large",
    422: "a field is invalid (`detail` lists each, with its location)",
    503: "overloaded: retry after `Retry-After` seconds",
    504: "no answer within the request timeout",
}

ENDPOINTS = [
    ("/v1/classify", ClassifyRequest, ClassifyResponse, "Classify images or feature vectors"),
    ("/v1/fill-mask", FillMaskRequest, FillMaskResponse, "Rank the words for each [MASK]"),
    ("/v1/embed", EmbedRequest, EmbedResponse, "Sentence embeddings (unit vectors)"),
    ("/v1/segment", SegmentRequest, SegmentResponse, "Customer segments with distances"),
]


@functools.cache
def openapi_document(version: str = "0.1.0") -> dict[str, Any]:
    from fastapi import FastAPI

    spec = FastAPI(
        title="dlpipe",
        description="Predictions from the models trained by the dlpipe pipeline.",
        version=version,
    )
    responses = {code: {"description": text} for code, text in ERRORS.items()}
    for path, request_model, response_model, summary in ENDPOINTS:
        # The annotation tells FastAPI the body's schema; the function is never called.
        def handler(request):  # pragma: no cover
            raise NotImplementedError

        handler.__annotations__ = {"request": request_model, "return": response_model}
        spec.post(
            path,
            summary=summary,
            response_model=response_model,
            responses=responses,
            operation_id=_operation_id(path),
        )(handler)
    for path, summary in [
        ("/healthz", "Liveness: the replica answers"),
        ("/readyz", "Readiness: at least one model is loaded (503 otherwise)"),
        ("/v1/models", "Name, version, alias, input schema and metrics of each model"),
    ]:
        spec.get(path, summary=summary, operation_id=_operation_id(path))(lambda: None)
    return spec.openapi()


def _operation_id(path: str) -> str:
    return path.strip("/").replace("/", "_").replace("-", "_")
