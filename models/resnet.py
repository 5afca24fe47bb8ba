"""A small residual CNN: a stem, one residual block per stage, global average pooling.

The identity shortcut lets gradients skip the convolutions, which is what keeps deeper
stacks trainable (compare per-layer gradient norms against the plain CNN).
"""

from __future__ import annotations

import torch
from torch import nn

from models.activations import make_activation, width_factor
from models.architecture import ArchitectureConfig, dense_head
from models.pooling import Pool2d


class ResidualBlock(nn.Module):
    """conv -> norm -> act -> conv -> norm, added to the input, then act."""

    def __init__(self, channels: int, arch: ArchitectureConfig) -> None:
        super().__init__()
        factor = width_factor(arch.activation)
        norm = nn.BatchNorm2d if arch.batch_norm else (lambda _c: nn.Identity())
        self.conv1 = nn.Conv2d(channels, channels * factor, arch.kernel_size, padding="same")
        self.norm1 = norm(channels * factor)
        self.act1 = make_activation(arch.activation, channels * factor)
        self.conv2 = nn.Conv2d(channels, channels, arch.kernel_size, padding="same")
        self.norm2 = norm(channels)
        # Maxout halves the width, so the output activation is applied to a doubled copy.
        self.act2 = make_activation(arch.activation, channels * factor)
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out)) + x  # the residual connection
        if self.factor > 1:
            out = out.repeat_interleave(self.factor, dim=1)
        return self.act2(out)


class ResidualCNN(nn.Module):
    def __init__(self, arch: ArchitectureConfig, input_shape: tuple[int, ...], num_outputs: int):
        super().__init__()
        channels_in, height, width = input_shape
        stages: list[nn.Module] = []
        for channels in arch.channels:
            # A 1x1 projection changes the width so the residual sum lines up.
            stages.append(nn.Conv2d(channels_in, channels, kernel_size=1))
            stages.append(ResidualBlock(channels, arch))
            if min(height, width) >= 2:
                stages.append(Pool2d(arch.pooling))
                height, width = height // 2, width // 2
            channels_in = channels
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = dense_head(arch, channels_in, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.features(x))  # (B, C, 1, 1)
        return self.head(features.flatten(1))  # (B, num_outputs)
