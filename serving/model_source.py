"""Finding the model files to serve: a local export folder or an MLflow registry model,
by alias (`models:/NAME@ALIAS`) or by version (`models:/NAME/3`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipelines.stagekit.lineage import GRAPH_HASH_TAG, REGISTRY_URI, model_lineage
from pipelines.stagekit.tracking import redacted

CARD_FILE = "model_card.json"
ONNX_FILE = "model.onnx"


class ModelNotFound(Exception):
    """The model source names nothing servable; the message says what was looked for."""


@dataclass(frozen=True)
class ModelFiles:
    onnx: Path
    card: Path
    source: str
    """What was asked for, e.g. models:/dlpipe-classifier@champion or a folder."""
    registered_model: str | None = None
    version: str | None = None
    """The registry version the files are, whatever the alias points to later."""
    alias: str | None = None
    registry_hashes: dict[str, str] | None = None
    """graph file -> sha256 as the registry records it (None for a folder)."""
    lineage: dict | None = None
    """Registry version -> ONNX sha256 -> run -> git commit -> DVC stages, data and params
    (pipelines/stagekit/lineage.py; None for a folder)."""

    def sibling(self, name: str) -> Path:
        """A file exported next to the card: beside it locally, under extra_files/ in a
        registry download (MLflow's layout), where the card also is."""
        for directory in (self.card.parent, self.onnx.parent):
            if (directory / name).is_file():
                return directory / name
        raise FileNotFoundError(f"{self.source}: {name} missing next to {self.card.name}")


def resolve_model(
    source: str, tracking_uri: str | None = None, version: str | None = None
) -> ModelFiles:
    """The ONNX file and model card behind `source`.

    `source` is a folder (e.g. artifacts/supervised/export) or a registry URI, downloaded
    from `tracking_uri`. An alias is resolved to its version first, so the files and the
    version reported are the same even if the alias moves meanwhile; `version` pins one
    (what `dlpipe serve reload` does so that every replica loads the same).
    """
    if not source.startswith("models:/"):
        return _find_files(Path(source), source)
    match = REGISTRY_URI.match(source)
    if match is None:
        raise ModelNotFound(f"{source}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    # A client of its own, not mlflow.set_tracking_uri: that is process-wide, and one
    # caller's store would become the next caller's (a CLI checking a challenger after a
    # stage registered a model elsewhere in the same process).
    client = MlflowClient(tracking_uri)
    name, alias = match["name"], match["alias"]
    try:
        if version is None:
            version = match["version"] or client.get_model_version_by_alias(name, alias).version
        tags = client.get_model_version(name, str(version)).tags
        # Where the version's files are stored, asked of this client: MLflow resolves a
        # models:/ URI in its process-wide registry whatever registry_uri it is given.
        directory = Path(
            download_artifacts(
                artifact_uri=client.get_model_version_download_uri(name, str(version)),
                tracking_uri=client.tracking_uri,
            )
        )
    except Exception as exc:
        raise ModelNotFound(f"{source}: cannot load from the MLflow registry ({exc})") from None
    files = _find_files(directory, source)
    try:
        lineage = model_lineage(client, name, None, str(version))
    except Exception as exc:  # the chain is for people; a model missing it still serves
        lineage = {"error": f"lineage unavailable: {redacted(str(exc))[:300]}"}
    hashes = {
        tag[len(GRAPH_HASH_TAG) :]: value
        for tag, value in tags.items()
        if tag.startswith(GRAPH_HASH_TAG)
    }
    return ModelFiles(files.onnx, files.card, source, name, str(version), alias, hashes, lineage)


def _find_files(directory: Path, source: str) -> ModelFiles:
    # Registry downloads keep the card under extra_files/ (MLflow's layout for extra files).
    for card in (directory / CARD_FILE, directory / "extra_files" / CARD_FILE):
        if card.is_file() and (directory / ONNX_FILE).is_file():
            return ModelFiles(directory / ONNX_FILE, card, source)
    raise ModelNotFound(f"{source}: expected {ONNX_FILE} and {CARD_FILE} in {directory}")
