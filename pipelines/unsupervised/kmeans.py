"""K-means on the Ray cluster: the points live in shards held by Ray actors.

Every Lloyd iteration sends the centroids to the shards, each returns its per-cluster
sums, counts and inertia (`models/kmeans.py`), and the driver adds them up: the data never
moves, only k x d numbers per shard. Initialisation is k-means++ done exactly across
shards (a shard is picked in proportion to its share of the squared distances, then a
point within it). Several restarts (`restarts`), the lowest inertia wins; an empty
cluster is re-seeded with the point farthest from its centroid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.kmeans import nearest, partial_sums
from pipelines.stagekit.errors import UserError


class KMeansShard:
    """One shard of the points (a Ray actor when used through `kmeans_shards`)."""

    def __init__(self, points: np.ndarray) -> None:
        # A private, writable copy (a Ray argument arrives as a read-only view).
        self.x = torch.from_numpy(np.array(points, dtype=np.float32))

    def size(self) -> int:
        return len(self.x)

    def distance_mass(self, centroids: np.ndarray | None) -> float:
        """Sum of squared distances to the nearest centroid (the number of points if none)."""
        if centroids is None:
            return float(len(self.x))
        return float(nearest(self.x, _tensor(centroids))[1].sum())

    def sample(self, centroids: np.ndarray | None, seed: int) -> np.ndarray:
        """A point drawn with probability proportional to its squared distance (uniformly
        when there are no centroids yet): the k-means++ draw within this shard."""
        generator = torch.Generator().manual_seed(seed)
        if centroids is None:
            index = torch.randint(len(self.x), (1,), generator=generator)
        else:
            weights = nearest(self.x, _tensor(centroids))[1].double()
            if float(weights.sum()) == 0.0:
                weights = torch.ones(len(self.x), dtype=torch.double)
            index = torch.multinomial(weights, 1, generator=generator)
        return self.x[index[0]].numpy()

    def step(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        sums, counts, inertia = partial_sums(self.x, _tensor(centroids))
        return sums.numpy(), counts.numpy(), float(inertia)

    def farthest(self, centroids: np.ndarray) -> tuple[np.ndarray, float]:
        _, best = nearest(self.x, _tensor(centroids))
        index = int(best.argmax())
        return self.x[index].numpy(), float(best[index])

    def labels(self, centroids: np.ndarray) -> np.ndarray:
        return nearest(self.x, _tensor(centroids))[0].numpy()


@dataclass(frozen=True)
class KMeansResult:
    centroids: np.ndarray
    """(k, d) float32."""
    labels: np.ndarray
    """(n,) int64, in the order of the points given."""
    inertia: float
    iterations: int


class ShardedPoints:
    """Handles on the shard actors, with the K-means driver logic over them."""

    def __init__(self, shards: list) -> None:
        import ray

        self.shards = shards
        self._get = ray.get

    def _all(self, method: str, *args) -> list:
        return self._get([getattr(s, method).remote(*args) for s in self.shards])

    def kmeans_plus_plus(self, k: int, seed: int) -> np.ndarray:
        """Greedy k-means++ (as scikit-learn does it): each new centroid is the best of
        2 + log(k) candidates drawn in proportion to squared distance, the one that lowers
        the total squared distance most."""
        rng = np.random.default_rng(seed)
        trials = 2 + int(np.log(k))
        centroids: np.ndarray | None = None
        for _ in range(k):
            masses = np.array(self._all("distance_mass", centroids))
            candidates = []
            for _ in range(trials if centroids is not None else 1):
                shard = self.shards[int(rng.choice(len(masses), p=masses / masses.sum()))]
                candidates.append(
                    self._get(shard.sample.remote(centroids, int(rng.integers(2**31))))
                )
            options = [
                c[None] if centroids is None else np.vstack([centroids, c]) for c in candidates
            ]
            potentials = [sum(self._all("distance_mass", o)) for o in options]
            centroids = options[int(np.argmin(potentials))]
        return centroids.astype(np.float32)

    def fit(
        self, k: int, seed: int = 0, restarts: int = 5, max_iterations: int = 100, tol: float = 1e-4
    ) -> KMeansResult:
        best: tuple[np.ndarray, float, int] | None = None
        for restart in range(restarts):
            centroids, inertia, iterations = self._lloyd(
                self.kmeans_plus_plus(k, seed * 1000 + restart), max_iterations, tol
            )
            if best is None or inertia < best[1]:
                best = (centroids, inertia, iterations)
        centroids, inertia, iterations = best
        labels = np.concatenate(self._all("labels", centroids))
        return KMeansResult(centroids, labels, inertia, iterations)

    def _lloyd(
        self, centroids: np.ndarray, max_iterations: int, tol: float
    ) -> tuple[np.ndarray, float, int]:
        iterations = 0
        while iterations < max_iterations:
            iterations += 1
            parts = self._all("step", centroids)
            sums = sum(p[0] for p in parts)
            counts = sum(p[1] for p in parts)
            updated = centroids.copy()
            filled = counts > 0
            updated[filled] = sums[filled] / counts[filled, None]
            for cluster in np.flatnonzero(~filled):  # re-seed an empty cluster
                candidates = self._all("farthest", updated)
                updated[cluster] = max(candidates, key=lambda c: c[1])[0]
            shift = float(np.abs(updated - centroids).max())
            centroids = updated.astype(np.float32)
            if shift < tol:  # the centroids have settled
                break
        final = sum(p[2] for p in self._all("step", centroids))
        return centroids, float(final), iterations


@contextlib.contextmanager
def kmeans_shards(points: np.ndarray, num_shards: int) -> Iterator[ShardedPoints]:
    """Split `points` (in order) over `num_shards` Ray actors for the duration of the block."""
    import ray
    from ray.util.placement_group import remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from pipelines.training.cluster import connect_ray, require_resources

    connect_ray()
    pieces = np.array_split(points, min(num_shards, len(points)))
    # One CPU per shard actor; they hold their shard for the whole sweep.
    require_resources(
        "CPU", len(pieces), f"segment.num_shards={num_shards}", "lower segment.num_shards"
    )
    # The shards' CPUs in one placement group: every shard starts or none does. Shards
    # placed one by one could each get some of the CPUs beside another stage of a
    # `dlpipe run --jobs` doing the same, and both would wait for ever for the rest.
    group = _placed([{"CPU": 1}] * len(pieces))
    remote = ray.remote(num_cpus=1)(KMeansShard)
    actors = [
        remote.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=i
            )
        ).remote(piece)
        for i, piece in enumerate(pieces)
    ]
    try:
        yield ShardedPoints(actors)
    finally:
        for actor in actors:
            ray.kill(actor)
        remove_placement_group(group)


def _placed(bundles: list[dict[str, float]]) -> Any:
    """A placement group of `bundles`, once placed; a clear error when Ray cannot place it
    in time: it would stay pending for ever (CPUs held by another job, or by a placement
    group that outlived its job). How long it waits: `resource_wait_s`."""
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group, remove_placement_group

    from pipelines.training.cluster import resource_wait_s

    timeout_s = resource_wait_s()
    group = placement_group(bundles, strategy="PACK")
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except GetTimeoutError:
        remove_placement_group(group)
        free = ray.available_resources().get("CPU", 0)
        total = ray.cluster_resources().get("CPU", 0)
        raise UserError(
            f"the {len(bundles)} K-means shard actors (1 CPU each) did not start within "
            f"{timeout_s:g} s: {free:g} of the cluster's {total:g} CPUs are free. `ray status` "
            "shows what holds them; or lower segment.num_shards"
        ) from None
    return group


def _tensor(centroids: np.ndarray) -> torch.Tensor:
    # Copied: arrays sent through Ray arrive read-only, and they are only k x d numbers.
    return torch.tensor(centroids, dtype=torch.float32)
