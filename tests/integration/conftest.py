"""One real run of the supervised stages (prepare -> train on 2 Ray workers -> evaluate ->
export) into a temporary MLflow store, shared by the integration tests of this folder."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from models.architecture import ArchitectureConfig
from pipelines.stagekit.config import ExportConfig, TrainConfig
from pipelines.supervised.config import PrepareConfig, TrackingConfig


@dataclasses.dataclass(frozen=True)
class TrainedPipeline:
    root: Path
    tracking: TrackingConfig
    mlflow_uri: str
    prepared: Path
    model_dir: Path
    export_dir: Path
    metrics: Path
    summary: dict


def quick_train_config(**overrides) -> TrainConfig:
    """Few epochs: enough for the digits to pass 0.9 accuracy, short enough for CI."""
    return TrainConfig(**{"epochs": 6, "batch_size": 32, "num_workers": 2, **overrides})


@pytest.fixture(scope="session")
def trained(ray_cluster, digits_folder, tmp_path_factory) -> TrainedPipeline:
    from pipelines.supervised.evaluate import evaluate
    from pipelines.supervised.export import export
    from pipelines.supervised.prepare import prepare
    from pipelines.supervised.train import train_supervised

    root = tmp_path_factory.mktemp("pipeline")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracking = TrackingConfig()
    export_config = ExportConfig()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("DLPIPE_STORAGE", str(root / "ray_results"))
        prepare(PrepareConfig(), str(digits_folder), str(root / "prepared"))
        summary = train_supervised(
            ArchitectureConfig(),
            quick_train_config(),
            tracking,
            data_dir=str(root / "prepared"),
            output=str(root / "model"),
            metrics_path=str(root / "metrics/train.json"),
            plots_dir=str(root / "plots"),
        )
        evaluate(
            tracking.experiment,
            str(root / "prepared"),
            str(root / "model"),
            str(root / "metrics/evaluate.json"),
            str(root / "plots"),
        )
        export(
            export_config,
            export_config.registered_model,
            tracking.experiment,
            str(root / "prepared"),
            str(root / "model"),
            str(root / "metrics/evaluate.json"),
            str(root / "export"),
            str(root / "metrics/supervised.json"),
        )
    return TrainedPipeline(
        root,
        tracking,
        uri,
        root / "prepared",
        root / "model",
        root / "export",
        root / "metrics",
        summary,
    )
