"""What a training run learns: the network, its step (loss and update) and its batches.

The worker adapter (`worker.py`) is the same for every stage; a task object, built by the
driver and shipped to the workers in the loop config, supplies the parts that differ.
Tasks are frozen dataclasses of plain values, so they pickle to any node of the cluster.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.architecture import ArchitectureConfig
from models.augmentation import AugmentConfig, augment
from models.autoencoder import Autoencoder, AutoencoderConfig
from models.gan import GanConfig, GanPair
from models.losses import FixMatchLoss, MaskedTokenLoss, TaskLoss
from models.transformer import EncoderConfig, MaskedLanguageModel
from models.vae import VAE, VaeConfig
from pipelines.stagekit.model_bundle import build_model
from pipelines.training.batches import ShardedBatches
from pipelines.training.fixmatch import FixMatchBatches
from pipelines.training.generative import GanStep, VaeStep
from pipelines.training.loop import Batches, Step, SupervisedStep
from pipelines.training.masking import MaskedTokenBatches, MaskedTokenStep, MaskingSpec


@dataclass(frozen=True)
class SupervisedTask:
    """Classification or regression on x_train/y_train, optionally with pseudo-labels
    (`pseudo_train` marks them; their weight ramps up as `pseudo` = {weight, ramp_epochs})."""

    architecture: ArchitectureConfig
    manifest: dict[str, Any]
    loss_name: str = "cross_entropy"
    huber_delta: float = 1.0
    pseudo: dict[str, float] | None = None
    augment: AugmentConfig | None = None
    """Applied to each training batch's inputs (images only)."""

    @property
    def classification(self) -> bool:
        return self.manifest["task"] == "classification"

    def build_model(self) -> nn.Module:
        return build_model(self.architecture, self.manifest)

    def step(self) -> Step:
        return SupervisedStep(
            TaskLoss(self.loss_name, self.manifest["task"], self.huber_delta), self.classification
        )

    def train_batches(
        self,
        arrays: dict[str, torch.Tensor],
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> Callable[[int], Batches]:
        pseudo = self.pseudo
        batches = ShardedBatches(
            arrays["x_train"],
            arrays["y_train"],
            batch_size,
            rank,
            world_size,
            seed=seed,
            pseudo=arrays.get("pseudo_train"),
            pseudo_weight=(lambda epoch: ramp_weight(epoch, **pseudo)) if pseudo else None,
        ).epoch
        if self.augment is None or not self.augment.enabled:
            return batches
        return functools.partial(augmented_batches, batches, self.augment)


@dataclass(frozen=True)
class FixMatchTask:
    """Semi-supervised classification (FixMatch): the labeled x_train/y_train and the
    unlabeled x_unlabeled pool, each unlabeled image seen in a weak and a strong view (see
    fixmatch.py); validated on x_val/y_val like a supervised run."""

    architecture: ArchitectureConfig
    manifest: dict[str, Any]
    weak: AugmentConfig
    strong: AugmentConfig
    threshold: float
    unlabeled_ratio: int
    unlabeled_weight: float = 1.0

    classification = True

    def build_model(self) -> nn.Module:
        return build_model(self.architecture, self.manifest)

    def step(self) -> Step:
        return SupervisedStep(FixMatchLoss(self.threshold, self.unlabeled_weight), True)

    def train_batches(
        self,
        arrays: dict[str, torch.Tensor],
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> Callable[[int], Batches]:
        return FixMatchBatches(
            arrays["x_train"],
            arrays["y_train"],
            arrays["x_unlabeled"],
            batch_size,
            self.unlabeled_ratio,
            self.weak,
            self.strong,
            rank,
            world_size,
            seed,
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

    def step(self) -> Step:
        return MaskedTokenStep(MaskedTokenLoss(), True)

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

    def step(self) -> Step:
        return SupervisedStep(TaskLoss(self.loss_name, "regression", self.huber_delta), False)

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


@dataclass(frozen=True)
class GenerativeTask:
    """What the VAE and the GAN share: images (or feature rows) x_train to learn to draw,
    validated on x_val, a grid of samples every `sample_every` epochs."""

    config: VaeConfig | GanConfig
    image_shape: tuple[int, ...]
    sample_every: int = 0
    """Epochs between the grids of samples the run logs (0: none)."""

    classification = False
    best_by_validation = True
    """Whether the lowest validation loss picks the weights kept (else the last epoch's)."""

    def samples(self, model: nn.Module) -> torch.Tensor:
        return latent_samples(model, self.config.latent)

    def train_batches(
        self,
        arrays: dict[str, torch.Tensor],
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
    ) -> Callable[[int], Batches]:
        """This worker's shuffled (x, label) batches of x_train/y_train: the labels go unread."""
        return ShardedBatches(
            arrays["x_train"], arrays["y_train"], batch_size, rank, world_size, seed=seed
        ).epoch


@dataclass(frozen=True)
class VaeTask(GenerativeTask):
    """A variational autoencoder on x_train (images with pixels in [0, 1], or standardized
    feature rows with the gaussian likelihood)."""

    config: VaeConfig

    def build_model(self) -> nn.Module:
        return VAE(self.config, self.image_shape)

    def step(self) -> Step:
        return VaeStep(self.config.beta, self.config.likelihood)


@dataclass(frozen=True)
class GanTask(GenerativeTask):
    """A DCGAN on x_train images (pixels in [0, 1]): generator and discriminator, each with
    its own optimizer (see GanPair)."""

    config: GanConfig
    best_by_validation = False  # a GAN's validation losses do not rank its samples

    def build_model(self) -> nn.Module:
        return GanPair(self.config, self.image_shape)

    def step(self) -> Step:
        return GanStep(self.config.latent, self.config.real_label)


Task = SupervisedTask | FixMatchTask | MaskedLmTask | AutoencoderTask | VaeTask | GanTask
"""Every kind of training run the one driver runs."""


def augmented_batches(
    batches: Callable[[int], Batches], config: AugmentConfig, epoch: int
) -> Iterator[tuple[torch.Tensor, ...]]:
    """`batches(epoch)` with each batch's inputs augmented; targets and weights unchanged.
    The draws come from torch's generator, which `fit` reseeds every epoch."""
    for x, *rest in batches(epoch):
        yield augment(x, config), *rest


def latent_samples(model: nn.Module, latent: int, count: int = 100, seed: int = 0) -> torch.Tensor:
    """`count` images a generative model (its `generate(z)`) draws from the same seeded
    latents every time: grids from epoch to epoch show the same draws taking shape."""
    z = torch.randn(count, latent, generator=torch.Generator().manual_seed(seed))
    training = model.training
    model.eval()  # batch norm's running statistics, as the exported graph uses them
    with torch.no_grad():
        images = model.generate(z.to(next(model.parameters()).device)).float().cpu()
    model.train(training)
    return images


def ramp_weight(epoch: int, weight: float, ramp_epochs: int) -> float:
    """Pseudo-label loss weight: weight/ramp_epochs in the first epoch, rising linearly to the
    full `weight` at epoch `ramp_epochs` (1-based) and staying there."""
    return weight * min(1.0, (epoch + 1) / max(ramp_epochs, 1))
