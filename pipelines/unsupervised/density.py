"""DBSCAN (scikit-learn's) and PCA for segmentation: density clusters with noise, and a
linear reduction to cluster in.

DBSCAN needs a radius `eps`; when none is set it is read off the k-distance curve, each
point's distance to its `min_samples`-th nearest neighbour, sorted: the knee of that curve
(its point farthest below the chord from its first to its last value) separates the points
inside dense regions from the sparse ones (Ester et al., 1996, choose it by eye on the same
plot). Points in no dense region are noise, label -1: reported as a segment of their own.
"""

from __future__ import annotations

import numpy as np


def k_distances(points: np.ndarray, min_samples: int) -> np.ndarray:
    """Each point's distance to its `min_samples`-th nearest neighbour (itself counted, as
    DBSCAN counts it), sorted ascending."""
    from sklearn.neighbors import NearestNeighbors

    distances, _ = NearestNeighbors(n_neighbors=min_samples).fit(points).kneighbors(points)
    return np.sort(distances[:, -1])


def knee_eps(points: np.ndarray, min_samples: int) -> float:
    """The k-distance at the curve's knee: its point farthest below the chord."""
    curve = k_distances(points, min_samples)
    span = curve[-1] - curve[0]
    if span <= 0:  # every point as dense as every other
        return float(curve[-1]) or 1e-12
    below = np.linspace(0.0, 1.0, len(curve)) - (curve - curve[0]) / span
    return float(curve[int(np.argmax(below))])


def dbscan_labels(points: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """Cluster ids 0..k-1, -1 for noise."""
    return dbscan(points, eps, min_samples)[0]


def dbscan(points: np.ndarray, eps: float, min_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(cluster ids 0..k-1 with -1 for noise, the indices of the core points)."""
    from sklearn.cluster import DBSCAN

    fitted = DBSCAN(eps=eps, min_samples=min_samples).fit(points)
    return fitted.labels_, fitted.core_sample_indices_


def pca(points: np.ndarray, components: int, seed: int):
    """scikit-learn's PCA of `points`, fitted."""
    from sklearn.decomposition import PCA

    return PCA(n_components=components, random_state=seed).fit(points)


def pca_codes(points: np.ndarray, components: int, seed: int) -> tuple[np.ndarray, float]:
    """The first `components` principal components of `points` and the share of the
    variance they explain."""
    fitted = pca(points, components, seed)
    return fitted.transform(points).astype(np.float32), float(
        fitted.explained_variance_ratio_.sum()
    )
