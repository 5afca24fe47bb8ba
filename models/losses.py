"""Loss functions chosen by name.

Every loss takes the network's raw output (logits for classification, values for
regression) and the targets as stored in the prepared data (class indices or floats), so
the training loop never needs to know which loss it is using.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Task = Literal["classification", "regression"]

LOSSES = ("mse", "mae", "huber", "bce", "cross_entropy", "kl_divergence")
CLASSIFICATION_ONLY = ("bce", "cross_entropy", "kl_divergence")


class TaskLoss(nn.Module):
    """Adapts one of the catalogue's losses to a task's outputs and targets."""

    def __init__(self, name: str, task: Task, huber_delta: float = 1.0) -> None:
        super().__init__()
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
        if task == "regression" and name in CLASSIFICATION_ONLY:
            raise ValueError(
                f"loss {name!r} needs class labels; a regression task takes mse, mae or huber"
            )
        self.name = name
        self.task = task
        self.huber_delta = huber_delta

    def forward(
        self, output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean loss over the batch; with `weight` (one per example), the mean of weighted losses
        (pseudo-labeled examples count less while their weight ramps up)."""
        per_example = self.per_example(output, target)
        if weight is None:
            return per_example.mean()
        return (per_example * weight.to(per_example.dtype)).mean()

    def per_example(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of each example: shape (B,)."""
        if self.task == "regression":
            return self._regression(output.reshape(target.shape), target.to(output.dtype))
        num_classes = output.shape[1]
        one_hot = F.one_hot(target, num_classes).to(output.dtype)
        if self.name == "cross_entropy":
            return F.cross_entropy(output, target, reduction="none")
        if self.name == "bce":
            # One-vs-rest: every class is its own sigmoid unit.
            return F.binary_cross_entropy_with_logits(output, one_hot, reduction="none").mean(1)
        if self.name == "kl_divergence":
            return F.kl_div(F.log_softmax(output, dim=1), one_hot, reduction="none").sum(1)
        # mse / mae / huber on class probabilities against the one-hot target.
        return self._regression(F.softmax(output, dim=1), one_hot)

    def _regression(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.name == "mse":
            errors = F.mse_loss(prediction, target, reduction="none")
        elif self.name == "mae":
            errors = F.l1_loss(prediction, target, reduction="none")
        else:
            errors = F.huber_loss(prediction, target, delta=self.huber_delta, reduction="none")
        return errors.reshape(errors.shape[0], -1).mean(1)


IGNORE_INDEX = -100
"""Target value of positions that carry no loss (unmasked tokens in masked-LM training)."""


class MaskedTokenLoss(nn.Module):
    """Cross-entropy over the positions whose target is not IGNORE_INDEX (the masked tokens).

    output (B, T, V) logits, target (B, T) token ids; the mean is over masked positions only,
    so a batch's loss does not depend on how many tokens happened to be masked."""

    def forward(
        self, output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        if weight is not None:
            raise ValueError("masked-token loss takes no per-example weights")
        return F.cross_entropy(output.flatten(0, -2), target.flatten(), ignore_index=IGNORE_INDEX)


class FixMatchLoss(nn.Module):
    """FixMatch's loss (Sohn et al., 2020) on one forward pass over a batch laid out as
    [labeled | unlabeled, weak view | the same unlabeled, strong view].

    target (B,) holds the labeled examples' classes and IGNORE_INDEX for every unlabeled
    position; the unlabeled half splits in two equal parts, weak views first. The loss is
    the labeled cross-entropy plus `unlabeled_weight` times the cross-entropy of each strong
    view's prediction against the class its weak view predicts, counted only where that
    prediction's probability reaches `threshold` (the weak view's side carries no gradient:
    it is the target). The mean of the unlabeled term is over all unlabeled examples, so a
    round with few confident ones pulls less."""

    def __init__(self, threshold: float, unlabeled_weight: float = 1.0) -> None:
        super().__init__()
        self.threshold, self.unlabeled_weight = threshold, unlabeled_weight

    def forward(
        self, output: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        if weight is not None:
            raise ValueError("the FixMatch loss takes no per-example weights")
        labeled = target != IGNORE_INDEX
        loss = F.cross_entropy(output[labeled], target[labeled])
        unlabeled = output[~labeled]  # (2U, C); none in validation batches
        if len(unlabeled) == 0:
            return loss
        weak, strong = unlabeled.chunk(2)
        confidence, pseudo = F.softmax(weak.detach(), dim=1).max(dim=1)
        kept = (confidence >= self.threshold).to(strong.dtype)
        consistency = (F.cross_entropy(strong, pseudo, reduction="none") * kept).mean()
        return loss + self.unlabeled_weight * consistency
