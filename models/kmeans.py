"""K-means arithmetic in torch: the per-shard pieces a distributed K-means reduces.

Each function works on one shard of the points; the driver (pipelines/unsupervised/kmeans.py) adds the
shards' sums and counts together, so the result equals K-means on all points at once.
"""

from __future__ import annotations

import torch


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(n, d), (k, d) -> (n, k) squared Euclidean distances (clamped: the expansion
    |x|^2 - 2 x.c + |c|^2 can dip below 0 by rounding)."""
    return (
        (x * x).sum(1, keepdim=True) - 2.0 * x @ centroids.T + (centroids * centroids).sum(1)
    ).clamp(min=0.0)


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (n,), squared distance to the nearest centroid (n,))."""
    distances = squared_distances(x, centroids)
    best, labels = distances.min(dim=1)
    return labels, best


def partial_sums(
    x: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Lloyd step's statistics of this shard: per-cluster sums of points (k, d),
    per-cluster counts (k,) and the shard's inertia (sum of squared distances)."""
    labels, best = nearest(x, centroids)
    k = centroids.shape[0]
    sums = torch.zeros_like(centroids).index_add_(0, labels, x)
    counts = torch.bincount(labels, minlength=k).to(x.dtype)
    return sums, counts, best.sum()
