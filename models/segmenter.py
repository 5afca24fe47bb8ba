"""Raw customer features -> segment, as one torch module (what the ONNX graph contains).

transform (log1p of the skewed columns, standardization) -> optional encoder -> Euclidean
distance to every centroid -> the nearest one. The fitted numbers are buffers, so the
exported graph needs nothing but the raw feature values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.kmeans import squared_distances


class Segmenter(nn.Module):
    def __init__(
        self,
        log_columns: Sequence[bool],
        mean: Sequence[float],
        std: Sequence[float],
        centroids: torch.Tensor,
        encoder: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("log_columns", torch.tensor(list(log_columns), dtype=torch.bool))
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))
        self.register_buffer("centroids", centroids.to(torch.float32))
        self.encoder = encoder

    def features(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, F) raw values -> the space the centroids live in."""
        logged = torch.where(self.log_columns, torch.log1p(raw.clamp(min=0.0)), raw)
        scaled = (logged - self.mean) / self.std
        return self.encoder(scaled) if self.encoder is not None else scaled

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(segment ids (B,) int64, distances to every centroid (B, k))."""
        points = self.features(raw)
        # Not torch.cdist: it has no ONNX export.
        distances = squared_distances(points, self.centroids).sqrt()
        return distances.argmin(dim=1), distances
