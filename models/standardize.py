"""Input standardization baked into the model, so exported graphs take raw inputs.

Keeping the statistics inside the network (as buffers) means the ONNX file served over
HTTP applies exactly the normalization used in training: no train/serve skew.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Standardize(nn.Module):
    """(x - mean) / std with per-feature (tabular) or per-channel (image) statistics."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], image: bool) -> None:
        super().__init__()
        shape = (1, -1, 1, 1) if image else (1, -1)
        std_tensor = torch.as_tensor(std, dtype=torch.float32).clamp_min(1e-6)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(shape))
        self.register_buffer("std", std_tensor.reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
