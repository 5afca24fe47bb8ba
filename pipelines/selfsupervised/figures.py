"""Held-out figures of a masked-language model and the two baselines they are read against.

Both baselines see only the training split's token counts and are scored on the same
masked validation positions as the model:
- most-frequent token: always predict the commonest training token;
- unigram model: predict each token with its training frequency (add-one smoothed, so a
  token never seen in training still has a finite perplexity).
"""

from __future__ import annotations

import math

import numpy as np

from models.losses import IGNORE_INDEX


def token_counts(blocks: np.ndarray, vocab_size: int, special_ids: list[int]) -> np.ndarray:
    """How often each regular token occurs in `blocks` (special tokens count 0)."""
    counts = np.bincount(blocks.ravel(), minlength=vocab_size).astype(np.float64)
    counts[list(special_ids)] = 0.0
    return counts


def baseline_figures(counts: np.ndarray, targets: np.ndarray, special_ids: list[int]) -> dict:
    """Most-frequent-token accuracy and unigram perplexity on the scored `targets`."""
    scored = targets[targets != IGNORE_INDEX]
    if scored.size == 0:
        raise ValueError("no masked positions to score")
    regular = len(counts) - len(set(special_ids))
    probabilities = (counts + 1.0) / (counts.sum() + regular)
    most_frequent = int(counts.argmax())
    return {
        "baseline_masked_accuracy": float(np.mean(scored == most_frequent)),
        "unigram_perplexity": float(math.exp(-np.mean(np.log(probabilities[scored])))),
        "most_frequent_token_id": most_frequent,
        "val_masked_tokens": int(scored.size),
    }


def model_figures(val_loss: float, val_accuracy: float) -> dict:
    """The model's figures from its validation epoch: the loss is the mean cross-entropy
    at the masked positions, so perplexity is its exponential."""
    return {"masked_accuracy": float(val_accuracy), "perplexity": float(math.exp(val_loss))}
