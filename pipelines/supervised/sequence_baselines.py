"""The time-series baselines `train_timeseries` measures its networks against, on the same
split: well-kept implementations from aeon, not new ones.

- dtw_1nn: 1-nearest neighbour under dynamic time warping, the archive's classic
  reference; it takes the series at their own lengths.
- rocket / minirocket: random convolution kernels summarised per series, then a ridge
  classifier. They need equal lengths: each series is zero-padded at its end to the
  longest length, after the per-channel standardisation the networks also get (a zero
  is then the channel's training mean).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pipelines.stagekit.dataset import PreparedData
from pipelines.stagekit.sequences import unpadded


def _dtw_1nn(seed: int) -> Any:
    from aeon.classification.distance_based import KNeighborsTimeSeriesClassifier

    return KNeighborsTimeSeriesClassifier(distance="dtw", n_neighbors=1)


def _rocket(seed: int) -> Any:
    from aeon.classification.convolution_based import RocketClassifier

    return RocketClassifier(random_state=seed, n_jobs=1)


def _minirocket(seed: int) -> Any:
    from aeon.classification.convolution_based import MiniRocketClassifier

    return MiniRocketClassifier(random_state=seed, n_jobs=1)


BASELINES: dict[str, tuple[Callable[[int], Any], bool]] = {
    "dtw_1nn": (_dtw_1nn, False),
    "rocket": (_rocket, True),
    "minirocket": (_minirocket, True),
}
"""name -> (its classifier for a seed, whether it needs equal-length series)."""


def standardised(x: np.ndarray, normalization: dict[str, list[float]]) -> np.ndarray:
    mean = np.asarray(normalization["mean"], dtype=np.float32)
    std = np.asarray(normalization["std"], dtype=np.float32)
    return (x - mean) / std  # NaN padding stays NaN


def baseline_predictions(name: str, data: PreparedData, seed: int) -> tuple[np.ndarray, float]:
    """Fit baseline `name` on train + val (it has no early stopping to feed) and predict
    the test split; returns (predicted class indices, seconds to fit and predict)."""
    make, equal_length = BASELINES[name]
    norm = data.manifest["normalization"]
    x_fit = standardised(np.concatenate([data.x("train"), data.x("val")]), norm)
    y_fit = np.concatenate([data.y("train"), data.y("val")])
    x_test = standardised(data.x("test"), norm)
    if equal_length:
        # (N, T, C) -> (N, C, T), padding -> 0
        fit_in, test_in = (
            np.nan_to_num(x).transpose(0, 2, 1).astype(np.float64) for x in (x_fit, x_test)
        )
    else:
        fit_in, test_in = unpadded(x_fit), unpadded(x_test)
    started = time.perf_counter()
    classifier = make(seed)
    classifier.fit(fit_in, y_fit)
    predicted = np.asarray(classifier.predict(test_in), dtype=np.int64)
    return predicted, time.perf_counter() - started
