"""Input standardization baked into the model, so exported graphs take raw inputs.

Keeping the statistics inside the network (as buffers) means the ONNX file served over
HTTP applies exactly the normalization used in training: no train/serve skew.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

STATISTICS_SHAPE = {"image": (1, -1, 1, 1), "tabular": (1, -1), "sequence": (1, 1, -1)}
"""How per-channel statistics broadcast over a batch of each input kind: images (B, C, H, W),
tables (B, F), sequences (B, T, C)."""


class Standardize(nn.Module):
    """(x - mean) / std with per-feature (tabular) or per-channel (image, sequence)
    statistics. A sequence's NaN padding stays NaN (models/recurrent.py reads it)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], input_kind: str) -> None:
        super().__init__()
        shape = STATISTICS_SHAPE[input_kind]
        std_tensor = torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(shape))
        self.register_buffer("std", std_tensor.reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
