"""One process's part of a training run, in plain PyTorch: what the Ray Train worker adapter
(`worker.py`) wraps, and what the training benchmark runs alone as its no-Ray reference.

`initial_state` builds the seeded network, its optimizer and early stopping; `fit_task` cuts
this process's shard into batches and runs `fit` with the run's learning-rate schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from models.optimizers import batch_size_for, make_optimizer
from pipelines.stagekit.config import TrainConfig
from pipelines.training.batches import shard_for_eval
from pipelines.training.loop import (
    EarlyStopping,
    TrainingState,
    fit,
    precision_for,
    scheduled_lr,
    unwrap,
)

if TYPE_CHECKING:
    from pipelines.training.tasks import Task

EVAL_BATCH_SIZE = 1024


def initial_state(
    task: Task,
    train: TrainConfig,
    prepare_model: Callable[[nn.Module], nn.Module] = lambda model: model,
) -> TrainingState:
    """A fresh run: `task`'s network, seeded so that every worker starts from the same
    weights, passed through `prepare_model` (Ray's DDP wrapping and device placement, or a
    plain `.to(device)`), with the optimizer and early stopping `train` asks for."""
    torch.manual_seed(train.seed)
    model = prepare_model(task.build_model())
    optimizers = {
        name: make_optimizer(
            train.optimizer,
            parameters,
            learning_rate(train, 0),
            weight_decay=train.weight_decay,
            momentum=train.momentum,
            betas=(train.beta1, 0.999),
        )
        for name, parameters in optimized_parts(model).items()
    }
    return TrainingState(model, optimizers, EarlyStopping(train.early_stopping_patience))


def optimized_parts(model: nn.Module) -> dict[str, Iterable[nn.Parameter]]:
    """The parameter sets that step on their own, one optimizer each: a model's `players`
    (a GAN's generator and discriminator, which take turns), else the whole model."""
    network = unwrap(model)
    players = getattr(network, "players", ())
    if players:
        return {name: getattr(network, name).parameters() for name in players}
    return {"model": model.parameters()}


def ddp_options(model: nn.Module) -> dict[str, Any]:
    """DistributedDataParallel's settings for `model`. A model with `players` runs one
    forward pass per player's step, and each leaves the other player without gradients (the
    discriminator's step detaches the generator's images; the generator's step freezes the
    discriminator): DDP must look for unused parameters, or it waits for them forever."""
    return {"find_unused_parameters": True} if getattr(model, "players", ()) else {}


def fit_task(
    state: TrainingState,
    task: Task,
    arrays: dict[str, torch.Tensor],
    train: TrainConfig,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda totals: totals,
    on_epoch_end: Callable[[dict[str, float], TrainingState], None] | None = None,
    lr_key: str = "train.lr",
) -> TrainingState:
    """Train `state` on worker `rank`'s shard of `arrays` (x_train/y_train/x_val/y_val as
    the task reads them) for `train.epochs`; `reduce` and `on_epoch_end` are `fit`'s hooks."""
    per_worker = -(-len(arrays["x_train"]) // world_size)
    batch_size = batch_size_for(train.optimizer, train.batch_size, per_worker)
    train_batches = task.train_batches(arrays, batch_size, rank, world_size, train.seed)
    val_batches = shard_for_eval(
        arrays["x_val"], arrays["y_val"], EVAL_BATCH_SIZE, rank, world_size
    )
    return fit(
        state,
        task.step(),
        train_batches,
        lambda: val_batches.epoch(0),
        epochs=train.epochs,
        device=device,
        precision=precision_for(device, train.amp),
        divergence_factor=train.divergence_factor,
        reduce=reduce,
        on_epoch_end=on_epoch_end,
        lr_at=lambda epoch: learning_rate(train, epoch),
        lr_key=lr_key,
        # Each worker its own dropout masks and augmentations, the same after a restart.
        seed=train.seed * 1_009 + rank,
        ema_decay=train.ema_decay,
    )


def learning_rate(train: TrainConfig, epoch: int) -> float:
    """The learning rate of `epoch`: `train.lr` through `train`'s schedule. The one path from
    params to the optimizer: the optimizer starts at epoch 0's and `fit` sets each epoch's."""
    return scheduled_lr(epoch, train.lr, train.epochs, train.lr_schedule, train.warmup_epochs)
