"""Activation functions chosen by name (the catalogue in DESIGN.md).

`maxout` is the odd one out: it takes the max over groups of `pieces` units, so the layer
feeding it must be `pieces` times wider. `width_factor` tells a network how much wider.
"""

from __future__ import annotations

import torch
from torch import nn

MAXOUT_PIECES = 2

ACTIVATIONS = ("sigmoid", "tanh", "relu", "leaky_relu", "prelu", "elu", "maxout", "softmax")


class Maxout(nn.Module):
    """Max over consecutive groups of `pieces` features along dim 1: (B, k*P, ...) -> (B, k, ...)."""

    def __init__(self, pieces: int = MAXOUT_PIECES) -> None:
        super().__init__()
        self.pieces = pieces

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[0], x.shape[1]
        grouped = x.reshape(b, c // self.pieces, self.pieces, *x.shape[2:])
        return grouped.amax(dim=2)


def width_factor(name: str) -> int:
    """How many inputs the activation consumes per output unit (2 for maxout, else 1)."""
    return MAXOUT_PIECES if name == "maxout" else 1


def make_activation(name: str, num_features: int) -> nn.Module:
    """Build the activation `name` for a layer with `num_features` output units/channels."""
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    if name == "relu":
        return nn.ReLU()
    if name == "leaky_relu":
        return nn.LeakyReLU(0.01)
    if name == "prelu":
        # One learned slope per unit/channel, as in He et al. (2015).
        return nn.PReLU(num_parameters=num_features)
    if name == "elu":
        return nn.ELU()
    if name == "maxout":
        return Maxout(MAXOUT_PIECES)
    if name == "softmax":
        return nn.Softmax(dim=1)
    raise ValueError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}")
