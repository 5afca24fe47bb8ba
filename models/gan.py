"""A small DCGAN (Radford et al., 2016) for images with pixels in [0, 1].

The generator turns a latent vector into an image: a linear layer to a (2w, H/4, W/4) map,
then two stride-2 transposed convolutions, each doubling height and width, batch
normalisation and ReLU between, a sigmoid at the end. The discriminator mirrors it with
stride-2 convolutions and LeakyReLU, ending in one logit: real or generated. Both losses are
binary cross-entropy; the usual stabilisers are in `GanConfig` and the training step:
one-sided label smoothing (real targets 0.9, so the discriminator never grows certain and
its gradient to the generator does not vanish) and Adam with beta1 = 0.5.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GanConfig:
    latent: int = 32
    """Size of the generator's input noise."""
    width: int = 64
    """Channels of the generator's last hidden map and the discriminator's first (the
    other hidden map has twice as many)."""
    real_label: float = 0.9
    """The discriminator's target for real images (one-sided label smoothing; 1.0: off)."""

    def __post_init__(self) -> None:
        if self.latent < 1 or self.width < 1:
            raise ValueError("latent and width must be >= 1")
        if not 0.5 < self.real_label <= 1.0:
            raise ValueError(f"real_label must be in (0.5, 1], got {self.real_label}")


def _check_shape(image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    channels, height, width = image_shape
    if height % 4 or width % 4:
        raise ValueError(
            f"the DCGAN halves images twice: height and width must divide by 4, got {height}x{width}"
        )
    return channels, height // 4, width // 4


class Generator(nn.Module):
    def __init__(self, config: GanConfig, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        channels, h, w = _check_shape(image_shape)
        wide = 2 * config.width
        self.start = (wide, h, w)
        self.project = nn.Sequential(
            nn.Linear(config.latent, wide * h * w), nn.BatchNorm1d(wide * h * w), nn.ReLU()
        )
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(wide, config.width, 4, stride=2, padding=1),  # (B, w, H/2, W/2)
            nn.BatchNorm2d(config.width),
            nn.ReLU(),
            nn.ConvTranspose2d(config.width, channels, 4, stride=2, padding=1),  # (B, C, H, W)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        start = self.project(z).view(-1, *self.start)  # (B, 2w, H/4, W/4)
        return torch.sigmoid(self.upsample(start))  # images in [0, 1]

    def folded(self) -> Generator:
        """A copy for inference whose transposed convolutions run as the matrix products
        they are, where that costs no more arithmetic (`DenseTransposedConv`)."""
        folded = copy.deepcopy(self).eval()
        shape = self.start
        for index, layer in enumerate(folded.upsample):
            if isinstance(layer, nn.ConvTranspose2d):
                dense = DenseTransposedConv(layer, shape)
                if dense.work <= DENSE_WORK_LIMIT * _transposed_conv_work(layer, shape):
                    folded.upsample[index] = dense
                shape = dense.out_shape
        return folded


DENSE_WORK_LIMIT = 1.0
"""Fold a transposed convolution only if the dense product does at most this many times its
multiply-adds: on a 2x2 input with a 4x4 kernel every input pixel reaches every output
pixel, so the two are the same work; on a larger input the dense map grows quadratically."""


def _transposed_conv_work(layer: nn.ConvTranspose2d, in_shape: tuple[int, int, int]) -> int:
    channels, height, width = in_shape
    kernel = layer.kernel_size[0] * layer.kernel_size[1]
    return channels * height * width * layer.out_channels * kernel // layer.groups


class DenseTransposedConv(nn.Module):
    """A transposed convolution on a fixed input shape as the one linear map it is.

    The generator's shapes are all fixed (only the batch varies), so each of its transposed
    convolutions is a constant matrix from the flattened input to the flattened output: the
    layer applied to every basis vector. onnxruntime's ConvTranspose kernel ran the first
    upsampling (128 -> 64 channels, 2x2 -> 4x4) at batch 32 in 1.37 ms, slower than torch,
    where the same product as one MatMul runs in about 0.15 ms (benchmarks/inference.py)."""

    def __init__(self, layer: nn.ConvTranspose2d, in_shape: tuple[int, int, int]) -> None:
        super().__init__()
        size = math.prod(in_shape)
        with torch.no_grad():
            basis = torch.eye(size).view(size, *in_shape)
            columns = F.conv_transpose2d(
                basis,
                layer.weight,
                None,
                layer.stride,
                layer.padding,
                layer.output_padding,
                layer.groups,
                layer.dilation,
            )  # (size, C', H', W'): the image of each input unit
        self.in_shape = tuple(in_shape)
        self.out_shape = tuple(columns.shape[1:])
        self.work = size * math.prod(self.out_shape)
        self.linear = nn.Linear(size, math.prod(self.out_shape))
        with torch.no_grad():
            self.linear.weight.copy_(columns.flatten(1).T)
            pixels = self.out_shape[1] * self.out_shape[2]
            bias = layer.bias if layer.bias is not None else torch.zeros(layer.out_channels)
            self.linear.bias.copy_(bias.repeat_interleave(pixels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1)).view(-1, *self.out_shape)


class Discriminator(nn.Module):
    def __init__(self, config: GanConfig, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        channels, h, w = _check_shape(image_shape)
        wide = 2 * config.width
        self.features = nn.Sequential(
            nn.Conv2d(channels, config.width, 4, stride=2, padding=1),  # (B, w, H/2, W/2)
            nn.LeakyReLU(0.2),
            nn.Conv2d(config.width, wide, 4, stride=2, padding=1),  # (B, 2w, H/4, W/4)
            nn.BatchNorm2d(wide),
            nn.LeakyReLU(0.2),
        )
        self.decide = nn.Linear(wide * h * w, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.decide(self.features(images).flatten(1)).squeeze(1)  # logits (B,)


def discriminator_loss(
    real_logits: torch.Tensor, fake_logits: torch.Tensor, real_label: float
) -> torch.Tensor:
    """BCE: real images toward `real_label` (smoothed), generated ones toward 0."""
    real = F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits, real_label))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating loss: -log D(G(z)), strong gradients while D still wins."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


class GanPair(nn.Module):
    """The generator and the discriminator trained together, as one module so that one
    DistributedDataParallel wrapper syncs both. They take turns, each with its own
    optimizer (`players` names them): `forward(real, z, "discriminator")` scores real
    images and generated ones, the generator's output detached so that its step leaves the
    generator alone; `forward(real, z, "generator")` scores generated images for the
    generator's step, the discriminator frozen meanwhile (see GanStep)."""

    players = ("generator", "discriminator")

    def __init__(self, config: GanConfig, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.config = config
        self.image_shape = tuple(image_shape)
        self.generator = Generator(config, image_shape)
        self.discriminator = Discriminator(config, image_shape)

    def forward(
        self, real: torch.Tensor, z: torch.Tensor, player: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(real logits, generated logits) for the discriminator's step; (generated
        logits, generated images) for the generator's."""
        if player == "discriminator":
            fake = self.generator(z).detach()
            # Two passes, not one over both batches: batch normalisation then sees a batch
            # of one kind at a time, as DCGAN trains it.
            return self.discriminator(real), self.discriminator(fake)
        fake = self.generator(z)
        return self.discriminator(fake), fake

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent) drawn from N(0, I) -> images in [0, 1] (B, C, H, W)."""
        return self.generator(z)

    def inference_form(self) -> GanPair:
        """A copy whose generator is folded (`Generator.folded`), for export."""
        pair = copy.deepcopy(self)
        pair.generator = self.generator.folded()
        return pair
