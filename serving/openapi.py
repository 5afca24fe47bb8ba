"""The OpenAPI document of the HTTP API, generated from the same pydantic models that
validate the requests (serving/schemas.py).

FastAPI builds the document; it never serves a request (see serving/http_api.py for why).
"""

from __future__ import annotations

import functools
from typing import Any

from serving.kinds import GET_ROUTES, KINDS

ERRORS = {
    400: "not UTF-8 JSON",
    404: "that model is not loaded in this app",
    413: "request body too large",
    422: "a field is invalid (`detail` lists each, with its location)",
    503: "overloaded: retry after `Retry-After` seconds",
    504: "no answer within the request timeout",
}


@functools.cache
def openapi_document(version: str = "0.1.0") -> dict[str, Any]:
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
