"""How good a segmentation is, and what its segments mean.

- Internal figures (no labels): inertia, silhouette (on a seeded sample: it is O(n^2)),
  Davies-Bouldin (lower is better), Calinski-Harabasz (higher is better).
- Stability: mean pairwise adjusted Rand index between fits with different seeds.
- Against labels, where they exist: Hungarian-matched accuracy, NMI and ARI.
- Profiles: size and mean raw feature values per segment, and a short name built from
  how each segment differs from the average customer.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from models.segmenter import NOISE


def internal_figures(x: np.ndarray, labels: np.ndarray, sample: int, seed: int) -> dict:
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

    if len(np.unique(labels)) < 2:
        return {
            "silhouette": float("nan"),
            "davies_bouldin": float("nan"),
            "calinski_harabasz": float("nan"),
        }
    return {
        "silhouette": float(
            silhouette_score(x, labels, sample_size=min(sample, len(x)), random_state=seed)
        ),
        "davies_bouldin": float(davies_bouldin_score(x, labels)),
        "calinski_harabasz": float(calinski_harabasz_score(x, labels)),
    }


def mean_pairwise_ari(labelings: list[np.ndarray]) -> float:
    from sklearn.metrics import adjusted_rand_score

    pairs = list(itertools.combinations(labelings, 2))
    if not pairs:
        return 1.0
    return float(np.mean([adjusted_rand_score(a, b) for a, b in pairs]))


def label_agreement(labels: np.ndarray, truth: np.ndarray) -> dict:
    """Hungarian-matched accuracy (each cluster mapped to one class, one-to-one), NMI, ARI."""
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    clusters, classes = np.unique(labels), np.unique(truth)
    counts = np.zeros((len(clusters), len(classes)))
    np.add.at(counts, (np.searchsorted(clusters, labels), np.searchsorted(classes, truth)), 1)
    rows, cols = linear_sum_assignment(-counts)
    return {
        "accuracy": float(counts[rows, cols].sum() / len(labels)),
        "nmi": float(normalized_mutual_info_score(truth, labels)),
        "ari": float(adjusted_rand_score(truth, labels)),
    }


# Words for a segment whose mean is well above (+) or below (-) the average customer's.
_DESCRIPTORS = {
    "recency_days": ("lapsed", "recent"),
    "frequency": ("frequent", "one-off"),
    "monetary_total": ("high-value", "low-value"),
    "monetary_mean": ("big-basket", "small-basket"),
    "tenure_days": ("long-standing", "new"),
    "interpurchase_days": ("slow-returning", "fast-returning"),
    "items_per_purchase": ("bulk", "single-item"),
}
_NOTABLE = 0.25  # standard deviations away from the overall mean


def profiles(raw: pd.DataFrame, labels: np.ndarray) -> list[dict]:
    """Per segment: id, size, share, mean of every raw feature and a descriptive name
    (up to three words for the features that stand out most, e.g. "recent high-value
    frequent"; "average" when none does; "noise" for DBSCAN's segment -1)."""
    overall_mean, overall_std = raw.mean(), raw.std(ddof=0).replace(0, 1.0)
    result = []
    for segment in sorted(np.unique(labels)):
        members = raw[labels == segment]
        means = members.mean()
        z = (means - overall_mean) / overall_std
        words = []
        for column in z.abs().sort_values(ascending=False).index:
            if abs(z[column]) < _NOTABLE or len(words) == 3:
                break
            high, low = _DESCRIPTORS.get(column, (f"high {column}", f"low {column}"))
            words.append(high if z[column] > 0 else low)
        result.append(
            {
                "segment": int(segment),
                "name": "noise" if segment == NOISE else " ".join(words) or "average",
                "size": len(members),
                "share": round(len(members) / len(raw), 4),
                "means": {c: round(float(v), 3) for c, v in means.items()},
            }
        )
    return result
