"""The trained-model file: weights plus everything needed to rebuild the network.

`model.pt` holds only tensors and plain data, so it loads with `torch.load(weights_only=True)`
(no pickled code). The network is rebuilt from its `ArchitectureConfig`, with the data's
normalization in front, and a softmax behind for classification when exported or evaluated.
"""

from __future__ import annotations

import dataclasses
import io
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from models import cnn
from models.architecture import ArchitectureConfig
from models.losses import TaskLoss
from models.networks import build_network
from models.standardize import Standardize
from pipelines.stagekit.atomic import write_bytes
from pipelines.stagekit.errors import UserError

if TYPE_CHECKING:
    from pipelines.stagekit.config import TrainConfig

MODEL_FILE = "model.pt"


def build_model(arch: ArchitectureConfig, manifest: dict[str, Any]) -> nn.Sequential:
    """Standardize (statistics from the manifest) followed by the network for this data."""
    task = manifest["task"]
    num_outputs = len(manifest["class_names"]) if task == "classification" else 1
    norm = manifest["normalization"]
    # Named stages: parameter names (and the gradient-norm curves) read `network.features.0`.
    return nn.Sequential(
        OrderedDict(
            standardize=Standardize(norm["mean"], norm["std"], manifest["input_kind"]),
            network=build_network(arch, tuple(manifest["input_shape"]), num_outputs),
        )
    )


def check_compatible(
    arch: ArchitectureConfig,
    train: TrainConfig,
    manifest: dict[str, Any],
    model_key: str = "model",
    train_key: str = "train",
) -> None:
    """Fail fast, before any worker starts, when the network or the loss cannot fit the
    prepared data described by `manifest` (e.g. a CNN on a table, cross-entropy on a
    regression); the message names `model_key` / `train_key`.loss, where the stage read them."""
    try:
        TaskLoss(train.loss, manifest["task"], train.huber_delta)
    except ValueError as exc:
        raise UserError(f"params.yaml: {train_key}.loss: {exc}") from None
    try:
        build_model(arch, manifest)
    except ValueError as exc:
        raise UserError(f"params.yaml: {model_key}: {exc}") from None


def fit_warnings(
    arch: ArchitectureConfig, manifest: dict[str, Any], train_examples: int
) -> list[str]:
    """What in `arch` is unlikely to learn this data (not an error: it may still work)."""
    if arch.kind != "cnn" or manifest["input_kind"] != "image":
        return []
    return cnn.fit_warnings(arch, tuple(manifest["input_shape"]), train_examples)


def inference_model(model: nn.Module, task: str) -> nn.Module:
    """What is evaluated and exported: class probabilities for classification, values otherwise."""
    model = model.eval()
    return nn.Sequential(model, nn.Softmax(dim=1)) if task == "classification" else model


def save_bundle(
    directory: str | Path,
    model: nn.Module,
    arch: ArchitectureConfig,
    manifest: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> Path:
    buffer = io.BytesIO()
    torch.save(
        {
            "architecture": dataclasses.asdict(arch),
            "manifest": manifest,
            "state_dict": model.state_dict(),
            "extra": extra or {},
        },
        buffer,
    )
    path = Path(directory) / MODEL_FILE
    write_bytes(path, buffer.getvalue())
    return path


def load_bundle(directory: str | Path) -> tuple[nn.Sequential, dict[str, Any]]:
    """Rebuild the trained model; returns (model in eval mode, the saved bundle's metadata)."""
    bundle = torch.load(Path(directory) / MODEL_FILE, map_location="cpu", weights_only=True)
    arch_fields = {
        k: tuple(v) if isinstance(v, list) else v for k, v in bundle["architecture"].items()
    }
    arch = ArchitectureConfig(**arch_fields)
    model = build_model(arch, bundle["manifest"])
    model.load_state_dict(bundle["state_dict"])
    return model.eval(), bundle


def load_trained(directory: str | Path, manifest: dict[str, Any]) -> tuple[nn.Sequential, dict]:
    """The trained model for data described by `manifest` and its bundle (its MLflow run:
    `tracking.producing_run(directory / MODEL_FILE, experiment)`).

    Raises UserError when the model is missing or was trained on other prepared data.
    """
    directory = Path(directory)
    if not (directory / MODEL_FILE).is_file():
        raise UserError(f"{directory / MODEL_FILE}: not found; run train_supervised first")
    model, bundle = load_bundle(directory)
    if bundle["manifest"] != manifest:
        raise UserError(
            f"{directory}: the model was trained on other prepared data; re-run train_supervised"
        )
    return model, bundle
