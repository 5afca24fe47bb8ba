"""FixMatch's training batches: a few labeled examples beside many unlabeled ones, each
unlabeled image in two views.

An epoch is one pass over this worker's shard of the unlabeled pool, `unlabeled_ratio`
times the labeled batch size per step; the labeled shard is cycled (reshuffled each time
round) to fill every step, because it is far smaller than the pool. Each step's inputs are
one tensor, [weakly augmented labeled | weak views | strong views of the same unlabeled
images], so the network sees them in one forward pass (batch normalization then normalizes
over all of them, as in the paper), and the targets carry IGNORE_INDEX at the unlabeled
positions (`models.losses.FixMatchLoss` reads that layout; accuracy counts labeled ones).
Shuffles are seeded per epoch, augmentations drawn from torch's generator, which `fit`
reseeds every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from models.augmentation import AugmentConfig, augment
from models.losses import IGNORE_INDEX
from pipelines.training.batches import ShardedBatches


class FixMatchBatches:
    def __init__(
        self,
        x_labeled: torch.Tensor,
        y_labeled: torch.Tensor,
        x_unlabeled: torch.Tensor,
        batch_size: int,
        unlabeled_ratio: int,
        weak: AugmentConfig,
        strong: AugmentConfig,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        if len(x_unlabeled) == 0:
            raise ValueError("FixMatch needs unlabeled examples; the pool is empty")
        self.x_labeled, self.y_labeled, self.x_unlabeled = x_labeled, y_labeled, x_unlabeled
        self.labeled = ShardedBatches(x_labeled, y_labeled, batch_size, rank, world_size, seed=seed)
        # A dummy target: only the order of the unlabeled examples is used.
        pool_ids = torch.zeros(len(x_unlabeled))
        self.unlabeled = ShardedBatches(
            x_unlabeled, pool_ids, batch_size * unlabeled_ratio, rank, world_size, seed=seed + 1
        )
        self.batch_size, self.weak, self.strong = batch_size, weak, strong

    def steps_per_epoch(self) -> int:
        return self.unlabeled.steps_per_epoch()

    def _labeled_indices(self, epoch: int, count: int) -> torch.Tensor:
        """`count` labeled indices of this worker: its shard in shuffled passes, as many
        passes as the epoch needs (each pass its own seeded order)."""
        passes, total, cycle = [], 0, 0
        while total < count:
            # Pass numbers unique across epochs: epoch e uses e * 10_000 + 0, 1, 2 ...
            order = self.labeled.indices(epoch * 10_000 + cycle)
            passes.append(order)
            total += len(order)
            cycle += 1
        return torch.cat(passes)[:count]

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pool = self.unlabeled.indices(epoch)
        starts = self.unlabeled.batch_starts(len(pool))
        labeled = self._labeled_indices(epoch, len(starts) * self.batch_size)
        for step, (start, end) in enumerate(zip(starts, [*starts[1:], len(pool)])):
            picked = labeled[step * self.batch_size : (step + 1) * self.batch_size]
            unlabeled = self.x_unlabeled[pool[start:end]]
            x = torch.cat(
                [
                    augment(self.x_labeled[picked], self.weak),
                    augment(unlabeled, self.weak),
                    augment(unlabeled, self.strong),
                ]
            )
            ignored = torch.full((2 * len(unlabeled),), IGNORE_INDEX, dtype=self.y_labeled.dtype)
            yield x, torch.cat([self.y_labeled[picked], ignored])
