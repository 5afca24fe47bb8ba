"""The two contracts between export and serving: the model card every export stage writes
beside its graph, and what every predictor offers the app."""

from __future__ import annotations

import json
from typing import Any, Protocol, TypedDict

from serving.model_source import ModelFiles


class ModelCard(TypedDict, total=False):
    """`model_card.json`, written by every export stage next to its graph, read by the
    predictors and the checks a version passes before it serves (serving/model_checks.py).
    Each kind adds its own keys (class names, tokenizer, segments ...)."""

    name: str
    """The registered model's name."""
    task: str
    """classification | regression | masked_lm | segmentation: which predictor loads it."""
    input: dict[str, Any]
    """The graph's input: name, shape, dtype, and what it means (kind, feature names)."""
    metrics: dict[str, float]
    """The export's figures (test accuracy, parity)."""
    hashes: dict[str, str]
    """sha256 of each graph (`onnx_sha256`, ...) and of what it was made from."""
    parity_sample: dict[str, Any]
    """The inputs and torch outputs saved at export, re-run before a version is served."""


class Predictor(Protocol):
    """What the app needs of every predictor; each adds the calls its routes make."""

    files: ModelFiles
    card: ModelCard

    def __init__(self, files: ModelFiles, threads: int = 1, use_gpu: bool | None = None) -> None:
        """Open the exported graph(s) in `files`; ValueError when the card's task is not
        this predictor's."""

    def info(self) -> dict[str, Any]:
        """What /v1/models shows of the model (name, input schema, metrics, hashes ...)."""


def served_name(predictor: Predictor) -> str:
    """The model's name in answers and metrics: its registered model when it came from the
    registry (a version promoted from another model is copied in, its card keeping the
    name it was trained under), else its card's."""
    return predictor.files.registered_model or predictor.card["name"]


def read_card(files: ModelFiles, task: str, kind: str) -> ModelCard:
    """The model card beside `files`, checked to describe a `task` model (`kind` names it in
    the error, e.g. "a classifier"), so a wrong source fails at load, not at the first call."""
    card: ModelCard = json.loads(files.card.read_text())
    if card.get("task") != task:
        raise ValueError(f"{files.source}: not {kind} (task {card.get('task')!r})")
    return card


def card_info(files: ModelFiles, card: ModelCard, session: Any) -> dict[str, Any]:
    """What /v1/models shows of every model, whatever its kind: its name, where it was loaded
    from, its task, test figures, graph hash and the onnxruntime providers it runs on."""
    return {
        "name": card["name"],
        "source": files.source,
        "task": card["task"],
        "metrics": card["metrics"],
        "onnx_sha256": card["hashes"]["onnx_sha256"],
        "providers": session.get_providers(),
    }
