"""Request and response bodies of the HTTP API (validated by pydantic; errors are 422s)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

MAX_BATCH = 1024
FLOAT32_MAX = 3.4028234663852886e38
"""Inputs become float32: a larger number would turn into inf."""
MAX_IMAGE_BASE64_CHARS = 8 * 1024 * 1024  # about 6 MB per encoded image

# Strict: JSON numbers only. Lax mode would read `true` as 1.0 and "0.5" as 0.5, and a
# client's bug would be answered as if the input were meant.
FiniteFloat = Annotated[
    float, Field(allow_inf_nan=False, strict=True, ge=-FLOAT32_MAX, le=FLOAT32_MAX)
]


def _whole(value: Any) -> Any:
    # JSON Schema's "integer" includes 5.0; `true` and "5" stay refused (strict below).
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole), Field(strict=True)]


INPUTS = ("instances", "images", "sequences")
"""The ways to send a classifier its inputs; a request uses exactly one."""


class ClassifyRequest(BaseModel):
    """Exactly one of `instances` (feature vectors), `images` (base64 PNG/JPEG) or
    `sequences` (time series, for a model trained on them)."""

    model_config = ConfigDict(extra="forbid")

    instances: list[list[FiniteFloat]] | None = Field(
        default=None,
        max_length=MAX_BATCH,
        description="Flattened inputs, e.g. 64 pixel values in [0, 1] for an 8x8 image.",
    )
    images: list[Annotated[str, Field(max_length=MAX_IMAGE_BASE64_CHARS)]] | None = Field(
        default=None,
        max_length=MAX_BATCH,
        description="Base64-encoded PNG or JPEG images.",
    )
    sequences: list[list[list[FiniteFloat]]] | None = Field(
        default=None,
        max_length=MAX_BATCH,
        description="Time series, each a list of time steps, each step a list of the "
        "model's channel values (e.g. 12 numbers per step for JapaneseVowels); lengths may "
        "differ, up to the model's max_length (GET /v1/models).",
    )

    @model_validator(mode="after")
    def exactly_one_input(self) -> ClassifyRequest:
        # `"images": null` beside `instances` would pass as "not given"; the OpenAPI
        # document says each field is an array, so the server says so too. Told from the
        # fields the body set, here: a "before" validator made pydantic build the whole
        # body as Python objects first (2.3 of the 5.4 us a digit's request took).
        for name in INPUTS:
            if name in self.model_fields_set and getattr(self, name) is None:
                raise ValueError(f"`{name}` is null: leave it out instead")
        given = [name for name in INPUTS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("send exactly one of `instances`, `images` or `sequences`")
        if not getattr(self, given[0]):
            raise ValueError(f"`{given[0]}` is empty")
        return self


class Prediction(BaseModel):
    label: str
    class_index: int
    confidence: float
    probabilities: dict[str, float]


class ClassifyResponse(BaseModel):
    model: str
    predictions: list[Prediction]


MAX_TEXTS = 256
MAX_TEXT_CHARS = 20_000

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Texts = Annotated[list[Text], Field(min_length=1, max_length=MAX_TEXTS)]


class FillMaskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: Texts = Field(
        description="Texts containing [MASK] one or more times, e.g. 'the [MASK] statement'."
    )
    top_k: WholeNumber = Field(default=5, ge=1, le=100, description="Predictions per [MASK].")


class TokenScore(BaseModel):
    token: str
    token_id: int
    score: float


class MaskPredictions(BaseModel):
    position: int
    """Index of the [MASK] in the tokenized text ([CLS] is position 0)."""
    predictions: list[TokenScore]


class FilledText(BaseModel):
    text: str
    masks: list[MaskPredictions]


class FillMaskResponse(BaseModel):
    model: str
    results: list[FilledText]


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: Texts = Field(
        description="Texts to embed; longer than the model's max_length tokens are truncated."
    )


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    """One L2-normalized vector per text (cosine similarity is their dot product)."""
    truncated: list[bool]
    """Whether each text was cut to the model's max_length tokens."""


class SegmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    customers: list[dict[str, FiniteFloat]] = Field(
        min_length=1,
        max_length=MAX_BATCH,
        description="One record per customer: every feature of the model by name (see "
        "GET /v1/models), e.g. recency_days, frequency, monetary_total, ...",
    )


class SegmentAssignment(BaseModel):
    segment: int
    name: str
    distances: list[float]
    """Distance to every segment's centroid (in the model's transformed space)."""


class SegmentResponse(BaseModel):
    model: str
    assignments: list[SegmentAssignment]


MAX_GENERATE = 64
"""Images one /v1/generate request may ask for."""


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    count: int = Field(1, ge=1, le=MAX_GENERATE, description="How many images to draw.")
    seed: int = Field(
        0, ge=0, le=2**63 - 1, description="The same seed and count give the same images."
    )
    label: int | None = Field(
        None, ge=0, description="The class to draw, for a conditional generator only."
    )


class GenerateResponse(BaseModel):
    model: str
    images: list[str]
    """Base64 PNG images, in the order of the seed's latents."""
    seed: int
