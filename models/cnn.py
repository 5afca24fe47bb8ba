"""Plain CNN: [conv -> (batch norm) -> activation -> 2x2 pool] blocks, then a dense head."""

from __future__ import annotations

import torch
from torch import nn

from models.activations import make_activation, width_factor
from models.architecture import ArchitectureConfig, dense_head
from models.pooling import Pool2d


class ConvNet(nn.Module):
    def __init__(self, arch: ArchitectureConfig, input_shape: tuple[int, ...], num_outputs: int):
        super().__init__()
        channels_in, height, width = input_shape
        factor = width_factor(arch.activation)
        blocks: list[nn.Module] = []
        for channels in arch.channels:
            blocks.append(
                nn.Conv2d(channels_in, channels * factor, arch.kernel_size, padding="same")
            )
            if arch.batch_norm:
                blocks.append(nn.BatchNorm2d(channels * factor))
            blocks.append(make_activation(arch.activation, channels * factor))
            # Stop pooling once the map is 1 pixel wide: tiny inputs (8x8 digits) stay valid.
            if min(height, width) >= 2:
                blocks.append(Pool2d(arch.pooling))
                height, width = height // 2, width // 2
            channels_in = channels
        self.features = nn.Sequential(*blocks)
        self.head = dense_head(arch, channels_in * height * width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)  # (B, C, H, W) -> (B, C', H', W')
        return self.head(features.flatten(1))  # (B, num_outputs)
