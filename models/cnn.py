"""Plain CNN: [conv -> (batch norm) -> activation -> 2x2 pool] blocks, then a dense head on
the flattened last feature map, or on each channel pooled over the whole map
(`global_pool`)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from models.activations import make_activation, width_factor
from models.architecture import ArchitectureConfig, dense_head
from models.pooling import Pool2d

GLOBAL_POOLS = {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d}


class ConvNet(nn.Module):
    def __init__(self, arch: ArchitectureConfig, input_shape: tuple[int, ...], num_outputs: int):
        super().__init__()
        channels_in = input_shape[0]
        factor = width_factor(arch.activation)
        blocks: list[nn.Module] = []
        for channels, pools in zip(arch.channels, block_pooling(arch, input_shape), strict=True):
            blocks.append(
                nn.Conv2d(channels_in, channels * factor, arch.kernel_size, padding="same")
            )
            if arch.batch_norm:
                blocks.append(nn.BatchNorm2d(channels * factor))
            blocks.append(make_activation(arch.activation, channels * factor))
            if pools:
                blocks.append(Pool2d(arch.pooling))
            channels_in = channels
        self.features = nn.Sequential(*blocks)
        if arch.global_pool == "none":
            self.pool: nn.Module = nn.Identity()
            height, width = feature_map_size(arch, input_shape)
            head_inputs = channels_in * height * width
        else:
            self.pool = GLOBAL_POOLS[arch.global_pool](1)
            head_inputs = channels_in
        self.head = dense_head(arch, head_inputs, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.pool(self.features(x))  # (B, C', H', W'), or (B, C', 1, 1) pooled
        return self.head(features.flatten(1))  # (B, num_outputs)


def block_pooling(arch: ArchitectureConfig, input_shape: tuple[int, ...]) -> Iterator[bool]:
    """For each conv block, whether a 2x2 pool follows it: pooling stops once the map is 1
    pixel wide, so tiny inputs (8x8 digits) stay valid."""
    _, height, width = input_shape
    for _ in arch.channels:
        pools = min(height, width) >= 2
        if pools:
            height, width = height // 2, width // 2
        yield pools


def feature_map_size(arch: ArchitectureConfig, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(height, width) of the last conv block's feature map."""
    _, height, width = input_shape
    for pools in block_pooling(arch, input_shape):
        if pools:
            height, width = height // 2, width // 2
    return height, width


def receptive_field(arch: ArchitectureConfig, input_shape: tuple[int, ...]) -> int:
    """The side, in input pixels, of the patch that one cell of the last feature map sees."""
    field, step = 1, 1
    for pools in block_pooling(arch, input_shape):
        field += (arch.kernel_size - 1) * step
        if pools:
            field += step
            step *= 2
    return field


def fit_warnings(
    arch: ArchitectureConfig, input_shape: tuple[int, ...], train_examples: int
) -> list[str]:
    """Settings unlikely to learn objects at any place in images of `input_shape` from
    `train_examples` images. Issue 19's folder of 126 training shapes at 40x40 showed both:
    the flattened 10x10 map stayed at chance, and so did global pooling over 2 blocks."""
    _, height, width = input_shape
    warnings = []
    field = receptive_field(arch, input_shape)
    if arch.global_pool != "none" and 2 * field < min(height, width):
        warnings.append(
            f"model.channels has {len(arch.channels)} conv block(s): a cell of the last "
            f"feature map sees {field}x{field} pixels of the {height}x{width} images, and "
            f"global_pool {arch.global_pool} keeps no larger pattern; add a block to "
            "model.channels (each one about doubles what a cell sees)"
        )
    map_height, map_width = feature_map_size(arch, input_shape)
    cells = map_height * map_width
    first_layer = (arch.hidden_sizes[0] if arch.hidden_sizes else 1) * width_factor(arch.activation)
    weights = cells * arch.channels[-1] * first_layer  # the head's first Linear
    if arch.global_pool == "none" and cells > 16 and weights > 100 * train_examples:
        warnings.append(
            f"the dense head reads a flattened {map_height}x{map_width} feature map "
            f"({weights:,} weights) from {train_examples} training images: it learns where "
            "things are, not what they are; set model.global_pool: avg (with enough conv "
            "blocks) when objects can be anywhere in the image"
        )
    return warnings
