"""In-memory mini-batches, sharded across data-parallel workers.

This is `DistributedSampler` without the DataLoader's per-example collate: indices are
shuffled with a seed shared by all workers, padded so every worker runs the same number of
steps (DDP needs that), and each worker takes every world_size-th index. Batches are tensor
slices, so data loading costs almost nothing next to the step itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch


class ShardedBatches:
    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        pseudo: torch.Tensor | None = None,
        pseudo_weight: Callable[[int], float] | None = None,
    ) -> None:
        """`pseudo` marks pseudo-labeled examples; they are weighted `pseudo_weight(epoch)`
        and batches become (x, y, weight). Without it batches are (x, y)."""
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} targets")
        self.x, self.y = x, y
        self.pseudo, self.pseudo_weight = pseudo, pseudo_weight
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed

    def indices(self, epoch: int) -> torch.Tensor:
        """This worker's example indices for `epoch` (the same count on every worker)."""
        n = len(self.x)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        per_worker = -(-n // self.world_size)  # ceil
        padding = per_worker * self.world_size - n
        if padding:
            order = torch.cat([order, order[:padding]])
        return order[self.rank :: self.world_size]

    def batch_starts(self, count: int) -> list[int]:
        """Where batches start; a trailing single example joins the batch before it, because
        batch normalization cannot normalise one value (and one-example steps are noise)."""
        starts = list(range(0, count, self.batch_size))
        if len(starts) > 1 and count - starts[-1] == 1 and self.batch_size > 1:
            starts.pop()
        return starts

    def steps_per_epoch(self) -> int:
        per_worker = -(-len(self.x) // self.world_size)
        return len(self.batch_starts(per_worker))

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        order = self.indices(epoch)
        starts = self.batch_starts(len(order))
        weights = None
        if self.pseudo is not None and self.pseudo_weight is not None:
            weights = torch.where(self.pseudo, self.pseudo_weight(epoch), 1.0).float()
        for start, end in zip(starts, [*starts[1:], len(order)]):
            batch = order[start:end]
            if weights is None:
                yield self.x[batch], self.y[batch]
            else:
                yield self.x[batch], self.y[batch], weights[batch]


def shard_for_eval(x: torch.Tensor, y: torch.Tensor, batch_size: int, rank: int, world_size: int):
    """Every world_size-th example, unshuffled and unpadded: each example counted exactly once."""
    return ShardedBatches(x[rank::world_size], y[rank::world_size], batch_size, shuffle=False)
