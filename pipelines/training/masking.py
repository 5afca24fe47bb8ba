"""BERT-style masking of token blocks for masked-language-model training.

Of the `probability` share of non-special tokens chosen in each sequence, 80% become
[MASK], 10% a random token and 10% stay unchanged; the loss is taken only at the chosen
positions (every other target is IGNORE_INDEX). Training batches are re-masked every
epoch (dynamic masking); validation is masked once with a fixed seed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from models.losses import IGNORE_INDEX
from pipelines.training.batches import ShardedBatches
from pipelines.training.loop import SupervisedStep

VALIDATION_MASK_SEED = 20_240_601
"""Seed of the one masking of the validation blocks: the same masked positions in every
run, so perplexity and accuracy are comparable between runs and with the baselines."""


@dataclass(frozen=True)
class MaskingSpec:
    vocab_size: int
    mask_id: int
    special_ids: tuple[int, ...]
    """Tokens never chosen for masking nor drawn as random replacements ([PAD], [CLS] ...)."""
    probability: float = 0.15


def mask_tokens(
    ids: torch.Tensor, spec: MaskingSpec, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token ids -> (inputs with masking applied, targets: the original id at chosen
    positions, IGNORE_INDEX elsewhere). At least one token is chosen whenever any can be,
    so no batch has an undefined (0/0) loss."""
    special = torch.isin(ids, torch.tensor(spec.special_ids, dtype=ids.dtype))
    chosen = (torch.rand(ids.shape, generator=generator) < spec.probability) & ~special
    if not chosen.any() and not special.all():
        candidates = torch.nonzero(~special.flatten()).flatten()
        pick = candidates[torch.randint(len(candidates), (1,), generator=generator)]
        chosen.view(-1)[pick] = True
    targets = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))
    action = torch.rand(ids.shape, generator=generator)
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(ids, spec.mask_id), ids)
    regular = torch.tensor(
        sorted(set(range(spec.vocab_size)) - set(spec.special_ids)), dtype=ids.dtype
    )
    replacements = regular[torch.randint(len(regular), ids.shape, generator=generator)]
    randomised = chosen & (action >= 0.8) & (action < 0.9)
    return torch.where(randomised, replacements, inputs), targets


class MaskedTokenBatches:
    """This worker's shard of the token blocks, re-masked every epoch: (inputs, targets)."""

    def __init__(
        self,
        blocks: torch.Tensor,
        spec: MaskingSpec,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self.rank, self.seed = rank, seed
        self.order = ShardedBatches(blocks, blocks, batch_size, rank, world_size, seed=seed)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # A different mask per epoch and per worker, reproducible after a restart.
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 997 + self.rank)
        for blocks, _ in self.order.epoch(epoch):
            yield mask_tokens(blocks, self.spec, generator)


def mask_for_validation(
    blocks: torch.Tensor, spec: MaskingSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation blocks masked once, identically in every run."""
    return mask_tokens(blocks, spec, torch.Generator().manual_seed(VALIDATION_MASK_SEED))


@dataclass(frozen=True)
class MaskedTokenStep(SupervisedStep):
    """`SupervisedStep` for masked-LM batches (inputs, targets (B, T)): the model scores only
    the masked positions (`MaskedLanguageModel.forward(ids, where)`), so the loss and the
    totals are those of the full logits without the other 85% of the vocabulary
    projection. The call goes through the (DDP-wrapped) model's forward: gradients sync."""

    def train(self, model, batch, optimizers, autocast, scaler) -> torch.Tensor:
        x, y = batch
        scored, target = _scored(model, y)
        return super().train(scored, (x, target), optimizers, autocast, scaler)

    def evaluate(self, model, batch, autocast) -> torch.Tensor:
        x, y = batch
        scored, target = _scored(model, y)
        return super().evaluate(scored, (x, target), autocast)


def _scored(model: nn.Module, targets: torch.Tensor) -> tuple[Callable, torch.Tensor]:
    """(model restricted to the masked positions of `targets`, those positions' targets)."""
    where = targets != IGNORE_INDEX
    return functools.partial(model, where=where), targets[where]
