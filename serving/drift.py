"""Input drift: how far the inputs a replica sees have moved from the ones its model was
trained on.

At export, each model writes `drift_reference.json` beside its graph (`reference_statistics`):
its training inputs summarised as a few numeric *drift features* per input, each with
its reference histogram. A replica keeps the last `window` inputs' features (a
`DriftMonitor` per served champion) and compares the two histograms of every feature with
the population stability index:

    PSI = sum over bins of (live share - reference share) * ln(live share / reference share)

0 when the shares match; by custom, under 0.1 is no shift, 0.1-0.25 a moderate one, above
0.25 a shift worth acting on (the default alarm). It is computed from bin counts kept up
to date as inputs come and go: a request pays a list append, and at least every
`check_every` inputs are binned together and the alarm checked (on a replica once per
turn of its event loop, for the requests answered in it: `request_path.json`'s
`drift_us` is what it costs a request).

The drift features, per kind of input (`layout` in the reference):
- values: tabular features and the segmenter's customer fields, as they are (with the
  Kolmogorov-Smirnov statistic too, from the reference's percentiles);
- image_grid: the mean intensity of each cell of an 8 x 8 grid over the image (for the
  8 x 8 digits, the pixels themselves);
- sequence_summary: each channel's mean and standard deviation over time, and the length;
- text: the sentence embedding projected on the reference's first principal components,
  and the token count; besides, `embedding_distance`, the Mahalanobis distance of the
  window's mean embedding from the reference mean (in reference standard deviations).

Bins are the reference's quintiles (fewer where values repeat, as pixels do; a value
beyond the reference's largest has a bin of its own). Shares are smoothed by half an
input per bin, so that an empty bin does not make PSI infinite.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.live_settings import over_defaults

REFERENCE_FILE = "drift_reference.json"
FORMAT_VERSION = 1
LAYOUTS = ("values", "image_grid", "sequence_summary", "text")
GRID = 8
"""Image drift features: the mean of each cell of a GRID x GRID grid."""
PRINCIPAL_COMPONENTS = 8
"""Text drift features: the embedding's projections on this many principal components."""
_QUINTILES = np.linspace(0.2, 0.8, 4)
"""Bin edges: PSI's floor from chance alone grows with the bins, about (bins - 1) / window,
and a replica watches 64 features at once (the largest counts): with deciles, 5,000
held-out digits reached PSI 0.19 in a 500-input window, with quintiles 0.13 (0.10 at
1,000), while inverted digits still raise the alarm within 50 inputs."""
_PERCENTILES = np.linspace(0.0, 1.0, 101)


# --- drift features: the same function at export (training inputs) and in the replica --


def image_rows(batch: np.ndarray) -> np.ndarray:
    """(n, [C,] H, W) images -> (n, cells) mean intensity per grid cell (channels averaged)."""
    height, width = batch.shape[-2:]
    flat = batch.reshape(len(batch), -1)  # channels first: (n, C * H * W)
    return flat @ _pooling(flat.shape[1] // (height * width), height, width)


@functools.lru_cache(maxsize=8)
def _pooling(channels: int, height: int, width: int) -> np.ndarray:
    """(C * H * W, cells): one matrix product averages every cell (a Python loop over the
    cells cost ~0.4 ms a request)."""
    rows = np.array_split(np.arange(height), min(GRID, height))
    cols = np.array_split(np.arange(width), min(GRID, width))
    matrix = np.zeros((channels, height, width, len(rows) * len(cols)), dtype=np.float32)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            size = channels * len(r) * len(c)
            matrix[:, r[0] : r[-1] + 1, c[0] : c[-1] + 1, i * len(cols) + j] = 1.0 / size
    return matrix.reshape(channels * height * width, -1)


def sequence_rows(batch: np.ndarray) -> np.ndarray:
    """(n, T, C) NaN-padded series -> (n, 2C + 1): per channel mean, std; the length."""
    present = ~np.isnan(batch[:, :, 0])
    lengths = present.sum(axis=1).astype(np.float64)
    steps = np.maximum(lengths, 1)[:, None]
    values = np.where(present[:, :, None], batch, 0.0)
    mean = values.sum(axis=1) / steps
    spread = np.sqrt(np.maximum((values**2).sum(axis=1) / steps - mean**2, 0.0))
    return np.concatenate([mean, spread, lengths[:, None]], axis=1)


def feature_rows(layout: str, batch: np.ndarray) -> np.ndarray:
    """A model input batch -> its drift features (n, features), for the non-text layouts."""
    if layout == "image_grid":
        return image_rows(batch)
    if layout == "sequence_summary":
        return sequence_rows(batch)
    return batch.reshape(len(batch), -1)


def feature_names(layout: str, input_shape: list[int], names: list[str] | None) -> list[str]:
    """The drift features' names for a model input of `input_shape` (no batch axis)."""
    if layout == "image_grid":
        height, width = input_shape[-2:]
        cell = "pixel" if (height, width) == (min(GRID, height), min(GRID, width)) else "cell"
        return [
            f"{cell}_{r}_{c}" for r in range(min(GRID, height)) for c in range(min(GRID, width))
        ]
    if layout == "sequence_summary":
        channels = names or [f"channel_{c}" for c in range(input_shape[-1])]
        return [*(f"{c}_mean" for c in channels), *(f"{c}_std" for c in channels), "length"]
    return list(names) if names else [f"feature_{i}" for i in range(math.prod(input_shape))]


def layout_of(input_kind: str) -> str:
    """The drift layout of a classifier's input kind (image | sequence | features)."""
    return {"image": "image_grid", "sequence": "sequence_summary"}.get(input_kind, "values")


# --- the reference, written at export ------------------------------------------------


def _histogram(values: np.ndarray) -> tuple[list[float], list[float]]:
    edges = np.unique(np.quantile(values, _QUINTILES))
    counts = np.bincount(np.searchsorted(edges, values, side="left"), minlength=len(edges) + 1)
    return edges.tolist(), (counts / len(values)).tolist()


def reference_statistics(
    layout: str,
    rows: np.ndarray,
    names: list[str],
    embeddings: np.ndarray | None = None,
) -> dict[str, Any]:
    """The drift reference of training inputs whose drift features are `rows` (n, features)
    (for text: `embeddings` (n, width) and `rows` the token counts (n, 1))."""
    if layout not in LAYOUTS:
        raise ValueError(f"drift layout {layout!r}: expected one of {LAYOUTS}")
    rows = np.asarray(rows, dtype=np.float64)
    reference: dict[str, Any] = {"format_version": FORMAT_VERSION, "layout": layout}
    if layout == "text":
        if embeddings is None:
            raise ValueError("a text reference needs the embeddings")
        vectors = np.asarray(embeddings, dtype=np.float64)
        mean = vectors.mean(axis=0)
        covariance = np.cov(vectors, rowvar=False)
        _, eigenvectors = np.linalg.eigh(covariance)  # ascending eigenvalues
        components = eigenvectors[:, ::-1][:, :PRINCIPAL_COMPONENTS].T  # (k, width)
        reference["embedding"] = {
            "mean": mean.tolist(),
            "covariance": covariance.tolist(),
            "components": components.tolist(),
        }
        rows = np.concatenate([(vectors - mean) @ components.T, rows], axis=1)
        names = [*(f"embedding_pc{i + 1}" for i in range(len(components))), *names]
    if rows.shape[1] != len(names):
        raise ValueError(f"{rows.shape[1]} drift features but {len(names)} names")
    features = []
    for column, name in zip(rows.T, names):
        edges, shares = _histogram(column)
        feature = {"name": name, "edges": edges, "shares": shares}
        if layout == "values":
            # The CDF at the percentiles, not the levels: with repeated values (counts)
            # the share at or below a percentile is more than its level.
            points = np.unique(np.quantile(column, _PERCENTILES))
            feature["percentiles"] = points.tolist()
            feature["cdf"] = (
                np.searchsorted(np.sort(column), points, "right") / len(column)
            ).tolist()
        features.append(feature)
    reference["count"] = len(rows)
    reference["features"] = features
    return reference


def write_reference(directory: Path, reference: dict[str, Any]) -> Path:
    from pipelines.stagekit.atomic import write_json

    path = Path(directory) / REFERENCE_FILE
    write_json(path, reference)
    return path


@dataclass(frozen=True)
class DriftReference:
    layout: str
    names: list[str]
    edges: np.ndarray
    """(features, most edges) ascending, padded with +inf."""
    shares: np.ndarray
    """(features, most edges + 1) the reference share per bin (smoothed, padded with 1)."""
    bins: np.ndarray
    """(features,) the number of bins of each feature."""
    count: int
    percentiles: np.ndarray | None = None
    """(features, at most 101) distinct percentiles (padded with +inf), for the KS
    statistic (values layout only)."""
    cdf: np.ndarray | None = None
    """(features, as percentiles) the reference's share at or below each (padded with 1)."""
    mean: np.ndarray | None = None
    components: np.ndarray | None = None
    precision: np.ndarray | None = None
    """Text: the reference embedding's mean, principal axes and inverse covariance."""

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> DriftReference:
        if raw.get("format_version") != FORMAT_VERSION or raw.get("layout") not in LAYOUTS:
            raise ValueError(
                f"drift reference: format_version {raw.get('format_version')!r}, layout "
                f"{raw.get('layout')!r}; expected {FORMAT_VERSION} and one of {LAYOUTS}"
            )
        features = raw["features"]
        most = max(len(f["edges"]) for f in features)
        edges = np.full((len(features), most), np.inf)
        count = int(raw["count"])
        bins = np.array([len(f["edges"]) + 1 for f in features])
        shares = np.ones((len(features), most + 1))
        for i, feature in enumerate(features):
            edges[i, : len(feature["edges"])] = feature["edges"]
            counts = np.asarray(feature["shares"]) * count
            shares[i, : bins[i]] = (counts + 0.5) / (count + 0.5 * bins[i])
        percentiles = cdf = None
        if all("percentiles" in f for f in features):
            points = max(len(f["percentiles"]) for f in features)
            percentiles = np.full((len(features), points), np.inf)
            cdf = np.ones((len(features), points))
            for i, feature in enumerate(features):
                percentiles[i, : len(feature["percentiles"])] = feature["percentiles"]
                cdf[i, : len(feature["cdf"])] = feature["cdf"]
        text = {}
        if raw["layout"] == "text":
            embedding = raw["embedding"]
            covariance = np.asarray(embedding["covariance"])
            ridge = 1e-6 * max(np.trace(covariance) / len(covariance), 1e-12)
            text = {
                "mean": np.asarray(embedding["mean"]),
                "components": np.asarray(embedding["components"]),
                "precision": np.linalg.inv(covariance + ridge * np.eye(len(covariance))),
            }
        return cls(
            raw["layout"], [f["name"] for f in features], edges, shares, bins, count,
            percentiles, cdf, **text,
        )  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> DriftReference:
        return cls.parse(json.loads(Path(path).read_text()))

    def rows(self, seen: Any) -> np.ndarray:
        """What a route saw (a model input batch; for text, (embeddings, token counts)) ->
        its drift features (n, features)."""
        if self.layout == "text":
            vectors, lengths = seen
            projected = (np.asarray(vectors, np.float64) - self.mean) @ self.components.T
            return np.concatenate([projected, np.asarray(lengths, np.float64)[:, None]], axis=1)
        return feature_rows(self.layout, seen)

    def bin_of(self, rows: np.ndarray) -> np.ndarray:
        """(n, features) values -> (n, features) bin indices (edges[b-1] < x <= edges[b])."""
        # Compared as (n, edges, features), features innermost: 12 us for 10 inputs of 64
        # features and 4 edges, where (n, features, edges) took 33 (once per drift update).
        return (rows[:, None, :] > self._edges_by_bin).sum(axis=1)

    @functools.cached_property
    def _edges_by_bin(self) -> np.ndarray:
        """`edges` as (1, most edges, features), contiguous, for `bin_of`."""
        return np.ascontiguousarray(self.edges.T)[None]


# --- the live window, per replica ------------------------------------------------------


MAX_WINDOW = 100_000
"""A replica keeps a window's values in memory (and KS compares them all): bounded."""


class DriftConfigError(ValueError):
    """A `drift` setting that cannot be used; the message names the setting."""


@dataclass(frozen=True)
class DriftConfig:
    """`user_config.drift` (`dlpipe serve drift`): the same for every slot of the app."""

    window: int = 1000
    """Inputs compared with the reference: the last `window` seen by the replica. PSI's
    floor from chance alone is about (bins - 1) / window (5 bins: 0.004 at 1,000); a
    window under ~100 raises alarms on a steady stream."""
    psi_alarm: float = 0.25
    """The alarm is up while a feature's PSI is at least this, once the window is full."""
    check_every: int = 10
    """Inputs between two checks of the alarm: its delay is at most this many more. On a
    replica a check waits for the turn of the event loop in which it fell due to end, so
    that every request answered in that turn (a batch) joins it: a few more inputs of
    delay, and a PSI that crosses `psi_alarm` and falls back within one turn is not
    counted as an alarm."""
    enabled: bool = True

    @classmethod
    def parse(cls, raw: Any) -> DriftConfig:
        values = over_defaults("drift", raw, cls(), DriftConfigError)
        for key, low, high in (("window", 10, MAX_WINDOW), ("check_every", 1, MAX_WINDOW)):
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise DriftConfigError(
                    f"drift.{key}: expected a whole number from {low} to {high:,}, got {value!r}"
                )
        alarm = values["psi_alarm"]
        if isinstance(alarm, bool) or not isinstance(alarm, int | float) or not alarm > 0:
            raise DriftConfigError(f"drift.psi_alarm: expected a number > 0, got {alarm!r}")
        if not isinstance(values["enabled"], bool):
            raise DriftConfigError(
                f"drift.enabled: expected true or false, got {values['enabled']!r}"
            )
        return cls(values["window"], float(alarm), values["check_every"], values["enabled"])


class DriftMonitor:
    """The last `config.window` inputs of one served model against its reference."""

    def __init__(self, reference: DriftReference, config: DriftConfig) -> None:
        self.reference = reference
        self.config = config
        features = len(reference.names)
        self._bins = np.zeros((config.window, features), dtype=np.int16)
        # The raw values only where the KS statistic is computed from them.
        with_ks = reference.percentiles is not None
        self._values = np.zeros((config.window, features)) if with_ks else None
        self._counts = np.zeros(reference.shares.shape, dtype=np.int64)
        self._offsets = np.arange(features)[None] * reference.shares.shape[1]
        """Feature f's bin b is cell f * most bins + b of the flattened counts."""
        self._half_bins = 0.5 * reference.bins[:, None]
        self._used = np.arange(reference.shares.shape[1])[None] < reference.bins[:, None]
        self._occupied = np.zeros(config.window, dtype=bool)
        width = 0 if reference.mean is None else len(reference.mean)
        self._embeddings = np.zeros((config.window, width))
        self._embedding_sum = np.zeros(width)
        self.seen = 0
        """Inputs observed since the model was loaded (or the settings changed)."""
        self.alarm = False
        self.alarms = 0
        """Times the alarm went up."""
        self.alarm_at: int | None = None
        """`seen` when the alarm last went up."""
        self.max_psi = 0.0
        self._pending: list[Any] = []
        self._pending_rows = 0

    @property
    def filled(self) -> int:
        return min(self.seen, self.config.window)

    def observe(self, seen: Any) -> None:
        """Add what a request's model saw (see DriftReference.rows) and, once `check_every`
        inputs have come, move them into the window and check the alarm (`update`)."""
        if self.hold(seen):
            self.update()

    def hold(self, seen: Any) -> bool:
        """Hold what a request's model saw until the next `update`; whether one is due
        (`check_every` inputs held). One request's share of the work is a list append:
        adding each alone cost ~40 us, and an update's numpy calls cost about the same
        whether they add 1 input or 100."""
        self._pending.append(seen)
        self._pending_rows += len(seen[0]) if self.reference.layout == "text" else len(seen)
        return self._pending_rows >= self.config.check_every

    def update(self) -> None:
        """The held inputs into the window, then the alarm checked."""
        self._fold()
        self._check()

    def _fold(self) -> None:
        """Move the inputs held by `hold` into the window."""
        if not self._pending:
            return
        pending, self._pending, self._pending_rows = self._pending, [], 0
        layout = self.reference.layout
        text = layout == "text"
        if layout in ("values", "image_grid"):  # one shape: one call for all (~3 us each)
            rows = self.reference.rows(np.concatenate(pending))
        else:  # series of other lengths; (embeddings, counts) pairs
            rows = np.concatenate([self.reference.rows(seen) for seen in pending])
        vectors = np.concatenate([np.asarray(s[0], np.float64) for s in pending]) if text else None
        window = self.config.window
        skipped = max(len(rows) - window, 0)  # a batch longer than the window: its tail
        rows = rows[skipped:]
        bins = self.reference.bin_of(rows)
        slots = np.arange(self.seen + skipped, self.seen + skipped + len(rows))
        at = slots % window
        evicted = at[self._occupied[at]]  # their inputs leave the window
        self._count(bins, self._bins[evicted])
        if text:
            self._embedding_sum += vectors[skipped:].sum(axis=0) - self._embeddings[evicted].sum(
                axis=0
            )
            self._embeddings[at] = vectors[skipped:]
        self._bins[at] = bins
        if self._values is not None:
            self._values[at] = rows
        self._occupied[at] = True
        self.seen += skipped + len(rows)

    def _count(self, added: np.ndarray, removed: np.ndarray) -> None:
        """Count the inputs' bins `added` (n, features) in, the `removed` ones out."""
        size = self._counts.size
        delta = np.bincount((self._offsets + added).ravel(), minlength=size)
        if len(removed):
            delta -= np.bincount((self._offsets + removed).ravel(), minlength=size)
        self._counts += delta.reshape(self._counts.shape)

    def psi(self) -> np.ndarray:
        """(features,) PSI of the window against the reference."""
        live = (self._counts + 0.5) / (max(self.filled, 1) + self._half_bins)
        expected = self.reference.shares
        return np.where(self._used, (live - expected) * np.log(live / expected), 0.0).sum(axis=1)

    def _check(self) -> None:
        if self.filled < self.config.window:
            return
        self.max_psi = float(self.psi().max())
        up = self.max_psi >= self.config.psi_alarm
        if up and not self.alarm:
            self.alarms += 1
            self.alarm_at = self.seen
        self.alarm = up

    def ks(self) -> np.ndarray | None:
        """(features,) the Kolmogorov-Smirnov statistic, its sup taken over the reference's
        percentiles (exact to a percentile's width)."""
        if self.reference.percentiles is None or self.filled == 0:
            return None
        values = self._values[self._occupied]  # (n, features)
        below = (values[:, :, None] <= self.reference.percentiles[None]).mean(axis=0)
        return np.abs(below - self.reference.cdf).max(axis=1)

    def embedding_distance(self) -> float | None:
        if self.reference.mean is None or self.filled == 0:
            return None
        delta = self._embedding_sum / self.filled - self.reference.mean
        return float(np.sqrt(max(delta @ self.reference.precision @ delta, 0.0)))

    def gauges(self) -> dict[str, float]:
        """feature -> value for `ray_dlpipe_drift{slot, feature}`: each feature's PSI, and
        `embedding_distance` for text."""
        self.update()
        values = dict(zip(self.reference.names, self.psi().tolist()))
        distance = self.embedding_distance()
        if distance is not None:
            values["embedding_distance"] = distance
        return values

    def status(self, top: int = 5) -> dict[str, Any]:
        """What /v1/models shows: the alarm, the window, the `top` features by PSI."""
        self.update()
        psi = self.psi()
        order = np.argsort(-psi)[:top] if self.filled else []  # nothing seen: no ranking
        ks = self.ks()
        return {
            **asdict(self.config),
            "layout": self.reference.layout,
            "features": len(self.reference.names),
            "seen": self.seen,
            "filled": self.filled,
            "alarm": self.alarm,
            "alarms": self.alarms,
            "alarm_at": self.alarm_at,
            "max_psi": float(psi.max()) if self.filled else 0.0,
            "top_psi": {self.reference.names[i]: round(float(psi[i]), 4) for i in order},
            "max_ks": float(ks.max()) if ks is not None else None,
            "embedding_distance": self.embedding_distance(),
        }
