"""A fully connected autoencoder: features -> bottleneck code -> reconstructed features.

The encoder is what segmentation keeps: K-means runs on its codes, and the exported graph
is transform -> encoder -> nearest centroid. The decoder mirrors the encoder's sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

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


class Autoencoder(nn.Module):
    """(B, F) -> (B, F) reconstruction; `encode` gives the (B, bottleneck) code."""

    def __init__(self, config: AutoencoderConfig, num_features: int) -> None:
        super().__init__()
        sizes = [num_features, *config.hidden_sizes, config.bottleneck]
        self.encoder = _stack(sizes, config)
        self.decoder = _stack(sizes[::-1], config)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encode(x))
