"""Raw customer features -> segment, as one torch module (what the ONNX graph contains).

transform (log1p of the skewed columns, standardization) -> optional encoder (PCA, an
autoencoder's or a VAE's) -> distance to every segment -> the nearest one, or noise.

A segment is held as points in the encoded space: K-means' centroid (one per segment), or
DBSCAN's core points (many). Its distance is the distance to its nearest point, and a
customer farther than `radius` from every segment is noise, segment -1: DBSCAN's rule
for a new point (within eps of a core point: that point's cluster; else noise). K-means
has no radius. The fitted numbers are buffers, so the exported graph needs nothing but
the raw feature values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

NOISE = -1
"""The segment of a customer near no segment (DBSCAN's noise)."""


class Segmenter(nn.Module):
    def __init__(
        self,
        log_columns: Sequence[bool],
        mean: Sequence[float],
        std: Sequence[float],
        centroids: torch.Tensor,
        encoder: nn.Module | None = None,
        point_segments: torch.Tensor | None = None,
        radius: float = math.inf,
    ) -> None:
        """`centroids` (n, d): the segments' points, one each unless `point_segments` (n,)
        says which segment (0..k-1) each point belongs to."""
        super().__init__()
        self.register_buffer("log_columns", torch.tensor(list(log_columns), dtype=torch.bool))
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32))
        self.register_buffer("centroids", centroids.to(torch.float32))
        self.encoder = encoder
        self.radius = float(radius)
        # Each segment's point indices, for a per-segment minimum: a handful of segments,
        # unrolled in the graph (one (B, k, n) mask would cost B x k x n floats).
        self.segments = 0
        if point_segments is not None:
            self.segments = int(point_segments.max()) + 1
            for segment in range(self.segments):
                members = torch.nonzero(point_segments == segment).flatten()
                self.register_buffer(f"members_{segment}", members)

    def features(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, F) raw values -> the space the segments' points live in."""
        logged = torch.where(self.log_columns, torch.log1p(raw.clamp(min=0.0)), raw)
        scaled = (logged - self.mean) / self.std
        return self.encoder(scaled) if self.encoder is not None else scaled

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(segment ids (B,) int64, -1 for noise; distance to every segment (B, k))."""
        points = self.features(raw)
        # Differences, not the |x|^2 - 2 x.c + |c|^2 expansion (models/kmeans.py) nor
        # torch.cdist (no ONNX export): a customer who is one of DBSCAN's core points sits
        # at distance 0 from it, where the expansion's rounding (~1e-7) under the square
        # root becomes ~3e-4, different in onnxruntime and torch. (B, n, d) is small: n is
        # k centroids or at most dbscan_max_core_points points of a few dimensions.
        differences = points.unsqueeze(1) - self.centroids.unsqueeze(0)  # (B, n, d)
        distances = differences.pow(2).sum(dim=2).sqrt()  # (B, n)
        if self.segments:  # (B, n) -> (B, k): each segment's nearest point
            distances = torch.stack(
                [
                    distances.index_select(1, getattr(self, f"members_{s}")).amin(dim=1)
                    for s in range(self.segments)
                ],
                dim=1,
            )
        nearest = distances.argmin(dim=1)
        if math.isinf(self.radius):
            return nearest, distances
        within = distances.amin(dim=1) <= self.radius
        return torch.where(within, nearest, torch.full_like(nearest, NOISE)), distances
