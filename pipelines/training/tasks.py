"""What a training run learns: the network, its loss and its training batches.

The worker adapter (`worker.py`) is the same for every stage; a task object, built by the
driver and shipped to the workers in the loop config, supplies the parts that differ.
Tasks are frozen dataclasses of plain values, so they pickle to any node of the cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.architecture import ArchitectureConfig
from models.autoencoder import Autoencoder, AutoencoderConfig
from models.losses import MaskedTokenLoss, TaskLoss
from models.transformer import EncoderConfig, MaskedLanguageModel
from pipelines.stagekit.model_bundle import build_model
from pipelines.training.batches import ShardedBatches
from pipelines.training.loop import Batches
from pipelines.training.masking import MaskedTokenBatches, MaskingSpec


@dataclass(frozen=True)
class SupervisedTask:
    """Classification or regression on x_train/y_train, optionally with pseudo-labels
    (`pseudo_train` marks them; their weight ramps up as `pseudo` = {weight, ramp_epochs})."""

    architecture: ArchitectureConfig
    manifest: dict[str, Any]
    loss_name: str = "cross_entropy"
    huber_delta: float = 1.0
    pseudo: dict[str, float] | None = None

    @property
    def classification(self) -> bool:
        return self.manifest["task"] == "classification"

    def build_model(self) -> nn.Module:
        return build_model(self.architecture, self.manifest)

    def loss(self) -> nn.Module:
        return TaskLoss(self.loss_name, self.manifest["task"], self.huber_delta)

    def train_batches(
        self,
        arrays: dict[str, torch.Tensor],
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> Callable[[int], Batches]:
        pseudo = self.pseudo
        return ShardedBatches(
            arrays["x_train"],
            arrays["y_train"],
            batch_size,
            rank,
            world_size,
            seed=seed,
            pseudo=arrays.get("pseudo_train"),
            pseudo_weight=(lambda epoch: ramp_weight(epoch, **pseudo)) if pseudo else None,
        ).epoch


@dataclass(frozen=True)
class MaskedLmTask:
    """Masked-language-model pretraining on packed token blocks (x_train), validated on
    blocks masked once in advance (x_val inputs, y_val targets)."""

    encoder: EncoderConfig
    masking: MaskingSpec
    pad_id: int

    classification = True  # "accuracy" is masked-token accuracy

    def build_model(self) -> nn.Module:
        return MaskedLanguageModel(self.encoder, self.masking.vocab_size, self.pad_id)

    def loss(self) -> nn.Module:
        return MaskedTokenLoss()

    def train_batches(
        self,
        arrays: dict[str, torch.Tensor],
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> Callable[[int], Batches]:
        return MaskedTokenBatches(
            arrays["x_train"].long(), self.masking, batch_size, rank, world_size, seed
        ).epoch


@dataclass(frozen=True)
class AutoencoderTask:
    """Reconstruction of x_train (targets are the inputs); validated on x_val."""

    config: AutoencoderConfig
    num_features: int
    loss_name: str = "mse"
    huber_delta: float = 1.0
    image_shape: tuple[int, ...] | None = None
    """(channels, height, width) of image rows: needed by the conv kind."""

    classification = False

    def build_model(self) -> nn.Module:
        return Autoencoder(self.config, self.num_features, self.image_shape)

    def loss(self) -> nn.Module:
        return TaskLoss(self.loss_name, "regression", self.huber_delta)

    def train_batches(
        self,
        arrays: dict[str, torch.Tensor],
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> Callable[[int], Batches]:
        x = arrays["x_train"]
        return ShardedBatches(x, x, batch_size, rank, world_size, seed=seed).epoch


def ramp_weight(epoch: int, weight: float, ramp_epochs: int) -> float:
    """Pseudo-label loss weight: weight/ramp_epochs in the first epoch, rising linearly to the
    full `weight` at epoch `ramp_epochs` (1-based) and staying there."""
    return weight * min(1.0, (epoch + 1) / max(ramp_epochs, 1))
