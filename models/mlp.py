"""Multi-layer perceptron: flatten, then fully connected hidden layers."""

from __future__ import annotations

import math

import torch
from torch import nn

from models.architecture import ArchitectureConfig, dense_head


class MLP(nn.Module):
    def __init__(self, arch: ArchitectureConfig, input_shape: tuple[int, ...], num_outputs: int):
        super().__init__()
        self.layers = dense_head(arch, math.prod(input_shape), num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.flatten(1))  # (B, *input_shape) -> (B, F) -> (B, num_outputs)
