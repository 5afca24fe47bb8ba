"""2x2 down-sampling by max, average or min pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Pool2d(nn.Module):
    """2x2 pooling; `min` is max pooling of the negated map (it keeps the darkest response)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in ("max", "avg", "min"):
            raise ValueError(f"unknown pooling {mode!r}; choose max, avg or min")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "max":
            return F.max_pool2d(x, 2)
        if self.mode == "avg":
            return F.avg_pool2d(x, 2)
        return -F.max_pool2d(-x, 2)
