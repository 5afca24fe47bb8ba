"""An autoencoder: features -> bottleneck code -> reconstructed features.

The encoder is what segmentation keeps: K-means runs on its codes, and the exported graph
is transform -> encoder -> nearest centroid. The decoder mirrors the encoder's sizes.
Two kinds: `dense` (fully connected, for any feature table) and `conv` (convolutions, for
images given as flattened rows: its filters are shared across positions, which on the
digits gave clearly better clusters than the dense kind).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from models.activations import ACTIVATIONS, make_activation, width_factor


@dataclass(frozen=True)
class AutoencoderConfig:
    hidden_sizes: tuple[int, ...] = (64, 32)
    """Encoder layer widths, input side first (the decoder uses them in reverse)."""
    bottleneck: int = 8
    """Size of the code that K-means clusters."""
    activation: str = "relu"
    """Activation between layers (any of models/activations.py except softmax)."""
    dropout: float = 0.0
    """Dropout after each hidden layer during training."""
    kind: Literal["dense", "conv"] = "dense"
    """dense: `hidden_sizes` are fully connected layers' widths. conv (images only):
    `hidden_sizes` are channel counts: a 3x3 convolution with the first, then one stride-2
    3x3 convolution per further size (each halves height and width), flattened into the
    bottleneck; the decoder mirrors it with transposed convolutions."""

    def __post_init__(self) -> None:
        if self.bottleneck < 1 or any(size < 1 for size in self.hidden_sizes):
            raise ValueError("bottleneck and hidden_sizes must be >= 1")
        if self.activation not in ACTIVATIONS or self.activation == "softmax":
            raise ValueError(
                f"activation {self.activation!r} unknown; choose one of "
                f"{', '.join(a for a in ACTIVATIONS if a != 'softmax')}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.kind not in ("dense", "conv"):
            raise ValueError(f"kind must be dense or conv, got {self.kind!r}")
        if self.kind == "conv" and (self.activation == "maxout" or not self.hidden_sizes):
            raise ValueError(
                "a conv autoencoder needs hidden_sizes and an activation other than maxout"
            )


def _stack(sizes: list[int], config: AutoencoderConfig) -> nn.Sequential:
    """Linear layers through `sizes`, activation + dropout between them, none at the end."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        if i == len(sizes) - 2:  # the code / the reconstruction: linear
            layers.append(nn.Linear(n_in, n_out))
            break
        # maxout takes the max over pieces: the layer feeds it `width_factor` x the units.
        layers.append(nn.Linear(n_in, n_out * width_factor(config.activation)))
        layers.append(make_activation(config.activation, n_out))
        if config.dropout:
            layers.append(nn.Dropout(config.dropout))
    return nn.Sequential(*layers)


def _conv_stacks(
    config: AutoencoderConfig, image_shape: tuple[int, int, int]
) -> tuple[nn.Sequential, nn.Sequential]:
    """(encoder, decoder) of the conv kind; both take and give flattened rows, so the
    rest of the pipeline (losses, K-means, the exported graph) sees (B, F) either way."""
    channels, height, width = image_shape
    scale = 2 ** (len(config.hidden_sizes) - 1)
    if height % scale or width % scale:
        raise ValueError(
            f"a conv autoencoder with {len(config.hidden_sizes)} layers halves the image "
            f"{len(config.hidden_sizes) - 1} times: {height}x{width} must divide by {scale}"
        )
    inner = (config.hidden_sizes[-1], height // scale, width // scale)
    flat_inner = math.prod(inner)

    def block(layer: nn.Module, units: int) -> list[nn.Module]:
        dropout = [nn.Dropout(config.dropout)] if config.dropout else []
        return [layer, make_activation(config.activation, units), *dropout]

    encoder: list[nn.Module] = [nn.Unflatten(1, image_shape)]
    n_in = channels
    for i, n_out in enumerate(config.hidden_sizes):
        encoder += block(nn.Conv2d(n_in, n_out, 3, stride=1 if i == 0 else 2, padding=1), n_out)
        n_in = n_out
    encoder += [nn.Flatten(), nn.Linear(flat_inner, config.bottleneck)]

    decoder: list[nn.Module] = [*block(nn.Linear(config.bottleneck, flat_inner), flat_inner)]
    decoder.append(nn.Unflatten(1, inner))
    sizes = config.hidden_sizes[::-1]
    for n_in, n_out in zip(sizes, sizes[1:]):
        # kernel 4, stride 2, padding 1: exactly doubles height and width
        decoder += block(nn.ConvTranspose2d(n_in, n_out, 4, stride=2, padding=1), n_out)
    decoder += [nn.Conv2d(sizes[-1], channels, 3, padding=1), nn.Flatten()]
    return nn.Sequential(*encoder), nn.Sequential(*decoder)


class Autoencoder(nn.Module):
    """(B, F) -> (B, F) reconstruction; `encode` gives the (B, bottleneck) code.

    The conv kind needs `image_shape` (channels, height, width) with
    channels * height * width == num_features."""

    def __init__(
        self,
        config: AutoencoderConfig,
        num_features: int,
        image_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if config.kind == "conv":
            if (
                image_shape is None
                or len(image_shape) != 3
                or math.prod(image_shape) != num_features
            ):
                raise ValueError(
                    f"a conv autoencoder needs images: got {num_features} features with image "
                    f"shape {image_shape} (use kind: dense for a feature table)"
                )
            self.encoder, self.decoder = _conv_stacks(config, tuple(image_shape))
            return
        sizes = [num_features, *config.hidden_sizes, config.bottleneck]
        self.encoder = _stack(sizes, config)
        self.decoder = _stack(sizes[::-1], config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x))
