"""The model kinds dlpipe serves: the one table the app, the HTTP routes, the OpenAPI
document, /v1/models and `dlpipe serve` read.

A kind is a predictor class (loads an exported folder, answers requests; no Ray), the app
argument that names its model, the registered model served by default, and its routes:
path, request and response schemas, and the call that turns a validated request into the
answer. Serving a new kind of model is a predictor module plus one row of `KINDS`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel

from serving.mlm_predictor import MaskedLmPredictor
from serving.predictor import ClassifierPredictor
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

Batch = Callable[[Any, np.ndarray], Awaitable[list[dict[str, Any]]]]
"""The app's batched call for a slot (serving/batcher.py), when it has one."""
Answer = Callable[[Any, Any, Batch | None], Awaitable[dict[str, Any]]]
"""(predictor, validated request, the slot's batched call or None) -> the answer body."""


@dataclass(frozen=True)
class Route:
    path: str
    request: type[BaseModel]
    response: type[BaseModel]
    summary: str
    answer: Answer


@dataclass(frozen=True)
class ModelKind:
    slot: str
    """The kind's name in /v1/models, `user_config.versions` and the metrics."""
    title: str
    """How messages name it ("no masked-language model is loaded")."""
    predictor: type
    """A class following `serving.contracts.Predictor`."""
    source_arg: str
    """The app argument naming the model to serve (`dlpipe serve --<source-arg>`)."""
    default_model: str
    """The registered model and alias served when none is named."""
    required: bool
    """`dlpipe serve` fails without it; an optional kind's endpoints are just left off."""
    routes: tuple[Route, ...]

    @property
    def app_default(self) -> str:
        """The model the app serves when its argument is left out: a required kind's default
        model; an optional kind's endpoints stay off (`dlpipe serve` adds its default
        when it is registered)."""
        return self.default_model if self.required else NO_MODEL


NO_MODEL = "none"
"""A model source that leaves its kind out of the app (its endpoints answer 404)."""


async def classify(
    classifier: ClassifierPredictor, request: ClassifyRequest, batch: Batch | None
) -> dict[str, Any]:
    if request.instances is not None:
        array = classifier.features_to_array(request.instances)
    else:
        array = classifier.images_to_array(request.images or [])
    predictions = await batch(classifier, array) if batch else classifier.classify(array)
    return {"predictions": predictions}


async def fill_mask(
    mlm: MaskedLmPredictor, request: FillMaskRequest, _: Batch | None
) -> dict[str, Any]:
    return {"results": mlm.fill_mask(request.texts, request.top_k)}


async def embed(mlm: MaskedLmPredictor, request: EmbedRequest, _: Batch | None) -> dict[str, Any]:
    vectors, truncated = mlm.embed(request.texts)
    return {"embeddings": vectors.tolist(), "truncated": truncated}


async def segment(
    segmenter: SegmentPredictor, request: SegmentRequest, _: Batch | None
) -> dict[str, Any]:
    return {"assignments": segmenter.segment(segmenter.records_to_array(request.customers))}


KINDS: tuple[ModelKind, ...] = (
    ModelKind(
        slot="classifier",
        title="classifier",
        predictor=ClassifierPredictor,
        source_arg="model",
        default_model="models:/dlpipe-classifier@champion",
        required=True,
        routes=(
            Route(
                "/v1/classify",
                ClassifyRequest,
                ClassifyResponse,
                "Classify images or feature vectors",
                classify,
            ),
        ),
    ),
    ModelKind(
        slot="mlm",
        title="masked-language model",
        predictor=MaskedLmPredictor,
        source_arg="mlm_model",
        default_model="models:/dlpipe-mlm@champion",
        required=False,
        routes=(
            Route(
                "/v1/fill-mask",
                FillMaskRequest,
                FillMaskResponse,
                "Rank the words for each [MASK]",
                fill_mask,
            ),
            Route(
                "/v1/embed",
                EmbedRequest,
                EmbedResponse,
                "Sentence embeddings (unit vectors)",
                embed,
            ),
        ),
    ),
    ModelKind(
        slot="segmenter",
        title="segmentation model",
        predictor=SegmentPredictor,
        source_arg="segment_model",
        default_model="models:/dlpipe-segment@champion",
        required=False,
        routes=(
            Route(
                "/v1/segment",
                SegmentRequest,
                SegmentResponse,
                "Customer segments with distances",
                segment,
            ),
        ),
    ),
)

BY_SLOT: dict[str, ModelKind] = {kind.slot: kind for kind in KINDS}

GET_ROUTES: tuple[tuple[str, str], ...] = (
    ("/healthz", "Liveness: the replica answers"),
    ("/readyz", "Readiness: at least one model is loaded (503 otherwise)"),
    ("/v1/models", "Name, version, alias, input schema and metrics of each model"),
    ("/openapi.json", "This document"),
)
"""The routes that answer about the app rather than with a model."""


def endpoints(base_url: str) -> list[str]:
    """`POST <url>/v1/classify`, ... : every route of the app, for people to read."""
    posts = [f"POST {base_url}{route.path}" for kind in KINDS for route in kind.routes]
    return [*posts, *(f"GET  {base_url}{path}" for path, _ in GET_ROUTES)]
