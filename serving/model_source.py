"""Finding the model files to serve: a local export folder or an MLflow registry alias."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CARD_FILE = "model_card.json"
ONNX_FILE = "model.onnx"


class ModelNotFound(Exception):
    """The model source names nothing servable; the message says what was looked for."""


@dataclass(frozen=True)
class ModelFiles:
    onnx: Path
    card: Path
    source: str


def resolve_model(source: str, tracking_uri: str | None = None) -> ModelFiles:
    """The ONNX file and model card behind `source`.

    `source` is a folder (e.g. artifacts/supervised/export) or a registry URI such as
    `models:/dlpipe-classifier@champion`, downloaded from `tracking_uri`.
    """
    if source.startswith("models:/"):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        try:
            directory = Path(mlflow.artifacts.download_artifacts(artifact_uri=source))
        except Exception as exc:
            raise ModelNotFound(f"{source}: cannot load from the MLflow registry ({exc})") from None
    else:
        directory = Path(source)
    # Registry downloads keep the card under extra_files/ (MLflow's layout for extra files).
    for card in (directory / CARD_FILE, directory / "extra_files" / CARD_FILE):
        if card.is_file() and (directory / ONNX_FILE).is_file():
            return ModelFiles(directory / ONNX_FILE, card, source)
    raise ModelNotFound(f"{source}: expected {ONNX_FILE} and {CARD_FILE} in {directory}")
