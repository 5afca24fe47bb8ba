"""BERT-style masking: proportions, special tokens, determinism."""

from __future__ import annotations

import contextlib

import torch

from models.losses import IGNORE_INDEX, MaskedTokenLoss
from models.transformer import EncoderConfig, MaskedLanguageModel
from pipelines.training.loop import SupervisedStep, batch_totals, scheduled_lr
from pipelines.training.masking import (
    MaskedTokenBatches,
    MaskedTokenStep,
    MaskingSpec,
    mask_for_validation,
    mask_tokens,
)

SPEC = MaskingSpec(vocab_size=1000, mask_id=4, special_ids=(0, 1, 2, 3, 4), probability=0.15)


def blocks(rows: int = 200, length: int = 64) -> torch.Tensor:
    ids = torch.randint(5, 1000, (rows, length), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 2  # [CLS]
    ids[:, -3:] = 0  # padding
    return ids


def test_masking_proportions_and_special_tokens():
    ids = blocks()
    inputs, targets = mask_tokens(ids, SPEC, torch.Generator().manual_seed(0))
    chosen = targets != IGNORE_INDEX
    regular = ids >= 5
    assert abs(chosen.sum() / regular.sum() - 0.15) < 0.01
    assert not chosen[~regular].any(), "special tokens must never be chosen"
    assert torch.equal(targets[chosen], ids[chosen])
    became_mask = (inputs == 4) & chosen
    unchanged = (inputs == ids) & chosen
    assert abs(became_mask.sum() / chosen.sum() - 0.8) < 0.03
    # 10% kept as they were (plus the rare random draw of the same token)
    assert abs(unchanged.sum() / chosen.sum() - 0.1) < 0.03
    assert torch.equal(inputs[~chosen], ids[~chosen]), "unchosen tokens stay as they were"
    assert (
        inputs.min() >= 0 and not torch.isin(inputs[chosen & ~became_mask], torch.arange(4)).any()
    )


def test_every_batch_gets_at_least_one_masked_token():
    short = torch.tensor([[2, 7, 3]])
    for seed in range(20):
        _, targets = mask_tokens(short, SPEC, torch.Generator().manual_seed(seed))
        assert (targets != IGNORE_INDEX).sum() >= 1


def test_training_masks_change_per_epoch_and_validation_mask_is_fixed():
    ids = blocks(32)
    batches = MaskedTokenBatches(ids, SPEC, batch_size=8, seed=0)
    first = [t for _, t in batches.epoch(0)]
    again = [t for _, t in batches.epoch(0)]
    other = [t for _, t in batches.epoch(1)]
    assert all(torch.equal(a, b) for a, b in zip(first, again)), "an epoch is reproducible"
    assert not all(torch.equal(a, b) for a, b in zip(first, other)), "dynamic masking"
    x1, y1 = mask_for_validation(ids, SPEC)
    x2, y2 = mask_for_validation(ids, SPEC)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_masked_loss_and_accuracy_count_masked_positions_only():
    logits = torch.zeros(1, 4, 10)
    logits[0, 1, 7] = 10.0  # right at position 1
    logits[0, 2, 3] = 10.0  # wrong at position 2 (target 5)
    targets = torch.tensor([[IGNORE_INDEX, 7, 5, IGNORE_INDEX]])
    loss = MaskedTokenLoss()(logits, targets)
    totals = batch_totals(logits, targets, loss, classification=True)
    assert totals[2].item() == 2  # two scored positions
    assert totals[1].item() == 1  # one correct


def test_masked_positions_step_matches_the_full_logits_step():
    """Scoring only the masked positions gives the loss, totals and gradients of scoring
    every position: the saving changes no figure."""
    torch.manual_seed(0)
    config = EncoderConfig(layers=1, width=32, heads=2, ffn_width=64, dropout=0.0, max_length=16)
    model = MaskedLanguageModel(config, SPEC.vocab_size)
    inputs, targets = mask_tokens(blocks(8, 16), SPEC, torch.Generator().manual_seed(3))
    results = []
    for step in (SupervisedStep(MaskedTokenLoss(), True), MaskedTokenStep(MaskedTokenLoss(), True)):
        model.zero_grad()
        evaluated = step.evaluate(model, (inputs, targets), contextlib.nullcontext)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keeps the weights
        trained = step.train(
            model, (inputs, targets), {"model": optimizer}, contextlib.nullcontext, None
        )
        gradient = model.token_embedding.weight.grad.clone()
        results.append((evaluated, trained, gradient))
    (full_eval, full_train, full_grad), (eval_, train, grad) = results
    assert full_eval[2] == (targets != IGNORE_INDEX).sum() > 0
    torch.testing.assert_close(eval_, full_eval)
    torch.testing.assert_close(train, full_train)
    torch.testing.assert_close(grad, full_grad)


def test_learning_rate_schedule_warms_up_then_decays_to_zero():
    lrs = [scheduled_lr(e, 1.0, 10, "cosine", warmup_epochs=2) for e in range(10)]
    assert lrs[0] < lrs[1] < lrs[2] == 1.0
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] < 0.05
    assert scheduled_lr(5, 0.1, 10) == 0.1
