"""The OpenAPI document of the HTTP API, generated from the same pydantic models that
validate the requests (serving/schemas.py), then narrowed to the models a replica serves:
only their routes, and each request body as that model checks it (input size, feature
names, value ranges: `Route.body` in serving/kinds.py). What JSON Schema cannot say is named
in the document instead: a custom string `format` (an image that decodes, a text within the
model's token limit) and `x-max-tokens`; the body-size limit is a 413 documented with the
responses. benchmarks/fuzz.py checks the document against the server both ways.

FastAPI builds the document; it never serves a request (see serving/http_api.py for why).
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from serving.kinds import GET_ROUTES, KINDS

ERRORS = {
    400: "not UTF-8 JSON",
    404: "that model is not loaded in this app",
    413: "request body too large",
    422: "a field is invalid (`detail` lists each, with its location)",
    401: "no valid API key (when the app has keys)",
    429: "over the rate limit per key: retry after `Retry-After` seconds",
    503: "overloaded, or the replica is stopping: retry after `Retry-After` seconds",
    504: "waited longer than the request timeout for the model (queued behind others)",
}


def openapi_document(models: Any = None) -> dict[str, Any]:
    """The document for the predictors `models` serves (a serving.model_slots.LoadedModels);
    None: every route, with the generic request schemas."""
    document = copy.deepcopy(_generic_document())
    if models is None:
        return document
    for kind in KINDS:
        predictor = models.get(kind.slot)
        for route in kind.routes:
            if predictor is None:  # its routes answer 404: not part of this app's API
                del document["paths"][route.path]
                continue
            body = document["paths"][route.path]["post"]["requestBody"]
            body["content"]["application/json"]["schema"] = route.body(predictor)
    return document


@functools.cache
def _generic_document(version: str = "0.1.0") -> dict[str, Any]:
    from fastapi import FastAPI

    spec = FastAPI(
        title="dlpipe",
        description="Predictions from the models trained by the dlpipe pipeline.",
        version=version,
    )
    responses = {code: {"description": text} for code, text in ERRORS.items()}
    for route in (route for kind in KINDS for route in kind.routes):
        # The annotation tells FastAPI the body's schema; the function is never called.
        def handler(request):  # pragma: no cover
            raise NotImplementedError

        handler.__annotations__ = {"request": route.request, "return": route.response}
        spec.post(
            route.path,
            summary=route.summary,
            response_model=route.response,
            responses=responses,
            operation_id=_operation_id(route.path),
        )(handler)
    for path, summary in GET_ROUTES:
        spec.get(path, summary=summary, operation_id=_operation_id(path))(lambda: None)
    return spec.openapi()


def _operation_id(path: str) -> str:
    return path.strip("/").replace("/", "_").replace("-", "_")
