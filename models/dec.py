"""Deep embedded clustering (DEC / IDEC) pieces: soft assignments and their sharpened target.

Refinement trains the encoder and the centroids together so that codes move towards the
centroid they already lean to (Xie et al. 2016); IDEC keeps the reconstruction loss
beside it so the codes stay faithful to the data (Guo et al. 2017).
"""

from __future__ import annotations

import torch


def soft_assignment(codes: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(n, d), (k, d) -> (n, k): Student's t kernel (one degree of freedom), rows sum to 1."""
    q = 1.0 / (1.0 + torch.cdist(codes, centroids) ** 2)
    return q / q.sum(dim=1, keepdim=True)


def target_distribution(q: torch.Tensor) -> torch.Tensor:
    """DEC's target: squares the assignments (confident ones count more) and divides by
    cluster frequency (so large clusters do not swallow the rest); rows sum to 1."""
    weight = q**2 / q.sum(dim=0)
    return weight / weight.sum(dim=1, keepdim=True)
