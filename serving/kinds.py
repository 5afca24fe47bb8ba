"""The model kinds dlpipe serves: the one table the app, the HTTP routes, the OpenAPI
document, /v1/models and `dlpipe serve` read.

A kind is a predictor class (loads an exported folder, answers requests; no Ray), the app
argument that names its model, the registered model served by default, and its routes:
path, request and response schemas, and the call that turns a validated request into the
answer. Serving a new kind of model is a predictor module plus one row of `KINDS`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel

from serving.generate_predictor import GeneratorPredictor
from serving.lifecycle import (
    Compare,
    compare_classifications,
    compare_embeddings,
    compare_fill_mask,
    compare_segments,
)
from serving.mlm_predictor import NOT_EMPTY, MaskedLmPredictor
from serving.predictor import ClassifierPredictor, InputError
from serving.schemas import (
    FLOAT32_MAX,
    MAX_BATCH,
    MAX_IMAGE_BASE64_CHARS,
    MAX_TEXT_CHARS,
    MAX_TEXTS,
    ClassifyRequest,
    ClassifyResponse,
    EmbedRequest,
    EmbedResponse,
    FillMaskRequest,
    FillMaskResponse,
    GenerateRequest,
    GenerateResponse,
    SegmentRequest,
    SegmentResponse,
)
from serving.segment_predictor import SegmentPredictor

Batch = Callable[[Any, Any], Awaitable[Any]]
"""The app's batched call for a route (serving/batcher.py), when it has one: (predictor,
one request's model input) -> what the route's `many` gives that request."""
Answer = Callable[[Any, Any, Batch | None], Awaitable[tuple[dict[str, Any], Any]]]
"""(predictor, validated request, the slot's batched call or None) -> (the answer body,
what the model saw for drift monitoring: its input batch, or for text (embeddings, token
counts); None when the route watches no drift; serving/drift.py)."""
Again = Callable[[Any, list[Any]], list[dict[str, Any] | Exception]]
"""(challenger, what the champion saw of each of several requests) -> the challenger's
answer body to each, or the exception only that request caused: shadow copies queued
for a moment, answered together in one model call (serving/lifecycle.py ShadowCopies)."""
Body = Callable[[Any], dict[str, Any]]
"""predictor -> the JSON Schema of the request bodies it accepts: what the pydantic model
checks, narrowed by what this loaded model checks (its input size, its feature names), so
that the OpenAPI document states everything the server enforces that JSON Schema can say."""

IMAGE_FORMAT = "dlpipe-image"
"""String format of `images` items: base64 of a PNG or JPEG (JSON Schema cannot say
"decodes to an image"; a fuzzer registers a generator under this name)."""
MASKED_TEXT_FORMAT = "dlpipe-masked-text"
"""String format of fill-mask texts: at most `x-max-tokens` tokens of the model's
tokenizer, which JSON Schema cannot count."""


@dataclass(frozen=True)
class Route:
    path: str
    request: type[BaseModel]
    response: type[BaseModel]
    summary: str
    answer: Answer
    body: Body
    compare: Compare | None = None
    """How two versions' answers to one request compare (shadow mode); None: they cannot
    (the generator's answers are random draws)."""
    many: Callable[[Any, list[Any]], list[Any]] | None = None
    """The predictor's method answering several requests' model inputs in one call, each
    its own answer or InputError (e.g. `ClassifierPredictor.classify_many`): the app then
    batches the route's concurrent requests (serving/batcher.py) and `answer` gets that
    call as its `batch`; None: each request is run alone."""
    again: Again | None = None
    """Shadow mode's shortcut: the challenger's answers from what the champion saw (its
    parsed input), several copies at once, not from each request again; None: from each
    request, one task per copy."""


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
    quality: tuple[str, bool] = ("test_accuracy", True)
    """The model card's figure a challenger must match to be promoted, and whether higher
    is better (serving/promotion.py)."""
    has_inputs: bool = True
    """Whether its requests carry inputs whose drift can be watched (serving/drift.py)."""

    @property
    def can_shadow(self) -> bool:
        return all(route.compare is not None for route in self.routes)

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
    elif request.sequences is not None:
        array = classifier.sequences_to_array(request.sequences)
    else:
        array = classifier.images_to_array(request.images or [])
    predictions = await batch(classifier, array) if batch else classifier.classify(array)
    return {"predictions": predictions}, array


def classify_again(
    classifier: ClassifierPredictor, arrays: list[np.ndarray]
) -> list[dict[str, Any] | Exception]:
    """Shadow copies: the rows the champion saw, through a challenger of the same input (a
    challenger is refused unless its inputs are the champion's), several requests in one
    onnxruntime call; the parsing is not done twice. Each row's label and confidence only,
    what `compare_classifications` reads: not the answer's per-class dicts."""
    probabilities = classifier.probabilities_of(arrays)
    # Whole-array numpy calls once for all the copies: per copy, their fixed cost (~1 us
    # each) was more than the Python rows (one digit a request).
    finite = np.isfinite(probabilities).all(axis=1).tolist()
    best = probabilities.argmax(axis=1).tolist()
    confidence = probabilities.max(axis=1).tolist()
    names = classifier.class_names
    answers: list[dict[str, Any] | Exception] = []
    start = 0
    for array in arrays:
        end = start + len(array)
        if all(finite[start:end]):
            rows = zip(best[start:end], confidence[start:end], strict=True)
            answers.append({"predictions": [{"label": names[i], "confidence": c} for i, c in rows]})
        else:
            answers.append(
                InputError(classifier.input_field, "the challenger's output is not finite")
            )
        start = end
    return answers


async def fill_mask(
    mlm: MaskedLmPredictor, request: FillMaskRequest, _: Batch | None
) -> dict[str, Any]:
    # Not watched for drift: masked texts are probes of the model, not its inputs' population.
    return {"results": mlm.fill_mask(request.texts, request.top_k)}, None


async def embed(
    mlm: MaskedLmPredictor, request: EmbedRequest, batch: Batch | None
) -> dict[str, Any]:
    if batch is None:
        vectors, truncated, lengths = mlm.embed(request.texts)
    else:
        vectors, truncated, lengths = await batch(mlm, request.texts)
    # The float32 array as it is: orjson writes each value's shortest float32 form, half
    # the bytes and time of tolist()'s float64 digits (8 x 128: 17 us against 38 us), and
    # a client reading it back as float32 gets the same numbers.
    return {"embeddings": vectors, "truncated": truncated}, (vectors, lengths)


async def segment(
    segmenter: SegmentPredictor, request: SegmentRequest, _: Batch | None
) -> dict[str, Any]:
    array = segmenter.records_to_array(request.customers)
    return {"assignments": segmenter.segment(array)}, array


async def generate(
    generator: GeneratorPredictor, request: GenerateRequest, _: Batch | None
) -> dict[str, Any]:
    images = generator.generate(request.count, request.seed, request.label)
    return {"images": images, "seed": request.seed}, None


def _number(low: float = -FLOAT32_MAX, high: float = FLOAT32_MAX) -> dict[str, Any]:
    return {"type": "number", "minimum": low, "maximum": high}


def _batch(items: dict[str, Any], most: int = MAX_BATCH) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": 1, "maxItems": most}


def _closed(properties: dict[str, Any], required: list[str], **extra: Any) -> dict[str, Any]:
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    return {**schema, **({"required": required} if required else {}), **extra}


def classify_body(classifier: ClassifierPredictor) -> dict[str, Any]:
    if classifier.sequence_input:
        channels = classifier.channels
        step = {"type": "array", "items": _number(), "minItems": channels, "maxItems": channels}
        sequence = {
            "type": "array",
            "items": step,
            "minItems": 1,
            "maxItems": classifier.max_length,
            "description": f"Time steps of {channels} channel value(s) each.",
        }
        return _closed({"sequences": _batch(sequence)}, ["sequences"])
    value = _number(0.0, 1.0) if classifier.pixel_input else _number()
    size = classifier.feature_count
    row = {"type": "array", "items": value, "minItems": size, "maxItems": size}
    properties = {"instances": _batch(row)}
    if not classifier.pixel_input:  # a feature-vector model takes no images
        return _closed(properties, ["instances"])
    image = {
        "type": "string",
        "format": IMAGE_FORMAT,
        "contentEncoding": "base64",
        "description": "A PNG or JPEG image, base64-encoded.",
        "maxLength": MAX_IMAGE_BASE64_CHARS,
    }
    # Exactly one of the two: the only properties allowed, and exactly one present.
    return _closed({**properties, "images": _batch(image)}, [], minProperties=1, maxProperties=1)


def fill_mask_body(mlm: MaskedLmPredictor) -> dict[str, Any]:
    text = {
        "type": "string",
        "pattern": r"\[MASK\]",
        "maxLength": MAX_TEXT_CHARS,
        "format": MASKED_TEXT_FORMAT,
        "x-max-tokens": mlm.max_length - 2,
        "description": f"At most {mlm.max_length - 2} tokens (the model's max_length "
        f"{mlm.max_length}, less [CLS] and [SEP]); longer texts are refused.",
    }
    top_k = {"type": "integer", "minimum": 1, "maximum": 100, "default": 5}
    return _closed({"texts": _batch(text, MAX_TEXTS), "top_k": top_k}, ["texts"])


def embed_body(mlm: MaskedLmPredictor) -> dict[str, Any]:
    text = {"type": "string", "pattern": NOT_EMPTY, "maxLength": MAX_TEXT_CHARS}
    return _closed({"texts": _batch(text, MAX_TEXTS)}, ["texts"])


def segment_body(segmenter: SegmentPredictor) -> dict[str, Any]:
    fields = {
        name: _number(0.0) if name in segmenter.non_negative else _number()
        for name in segmenter.features
    }
    return _closed({"customers": _batch(_closed(fields, list(segmenter.features)))}, ["customers"])


def generate_body(generator: GeneratorPredictor) -> dict[str, Any]:
    properties = GenerateRequest.model_json_schema()["properties"]
    if not generator.conditional:  # an unconditional model refuses a label
        properties = {k: v for k, v in properties.items() if k != "label"}
    return _closed(properties, [])


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
                "Classify images, feature vectors or time series",
                classify,
                classify_body,
                compare_classifications,
                many=ClassifierPredictor.classify_many,
                again=classify_again,
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
                fill_mask_body,
                compare_fill_mask,
            ),
            Route(
                "/v1/embed",
                EmbedRequest,
                EmbedResponse,
                "Sentence embeddings (unit vectors)",
                embed,
                embed_body,
                compare_embeddings,
                many=MaskedLmPredictor.embed_many,
            ),
        ),
        quality=("masked_accuracy", True),
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
                segment_body,
                compare_segments,
            ),
        ),
        quality=("silhouette", True),
    ),
    ModelKind(
        slot="generator",
        title="generative model",
        predictor=GeneratorPredictor,
        source_arg="generator_model",
        default_model="models:/dlpipe-generator@champion",
        required=False,
        routes=(
            Route(
                "/v1/generate",
                GenerateRequest,
                GenerateResponse,
                "Draw new images (base64 PNG), the same for the same seed",
                generate,
                generate_body,
            ),
        ),
        quality=("fid", False),
        has_inputs=False,  # a count, a seed and a label
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


def endpoints(base_url: str, slots: Collection[str] | None = None) -> list[str]:
    """`POST <url>/v1/classify`, ... : the routes of the kinds in `slots` (None: every
    kind) and the app's own, for people to read."""
    posts = [
        f"POST {base_url}{route.path}"
        for kind in KINDS
        if slots is None or kind.slot in slots
        for route in kind.routes
    ]
    return [*posts, *(f"GET  {base_url}{path}" for path, _ in GET_ROUTES)]
