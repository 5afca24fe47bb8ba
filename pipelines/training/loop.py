"""The training loop in plain PyTorch: no Ray, no MLflow, testable in a second.

`fit` runs epochs of `run_epoch` over a `Step` (what one batch does: `SupervisedStep`'s
model(x) -> loss(output, y) for most tasks, a task's own for the generative models), with
early stopping on validation loss and divergence detection. Distributed training plugs in through two hooks: `reduce` sums
per-worker totals (an all-reduce under Ray Train) and `on_epoch_end` reports and
checkpoints. Everything a run needs to resume lives in `TrainingState`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from models.losses import IGNORE_INDEX


class TrainingDiverged(Exception):
    """The loss became NaN/inf or exploded; the message names the learning rate."""


@dataclass
class EarlyStopping:
    """Stop after `patience` epochs without a lower validation loss (patience 0: never stop)."""

    patience: int
    best_loss: float = math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0

    def update(self, val_loss: float, epoch: int) -> bool:
        """Record an epoch; True when this epoch is the best so far."""
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch = val_loss, epoch
            self.epochs_without_improvement = 0
            return True
        self.epochs_without_improvement += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.epochs_without_improvement >= self.patience


@dataclass
class TrainingState:
    """Everything needed to continue a run after a restart."""

    model: nn.Module
    optimizers: dict[str, torch.optim.Optimizer]
    """One per part of the model that steps on its own: {"model": ...} for most tasks,
    {"generator": ..., "discriminator": ...} for a GAN (see `optimized_parts`)."""
    early_stopping: EarlyStopping
    next_epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best_model_state: dict[str, torch.Tensor] | None = None
    first_train_loss: float | None = None
    """The untrained model's loss (see `initial_loss`): what divergence is measured against."""
    scaler: torch.amp.GradScaler | None = None
    """fp16's loss scaler (see `gradient_scaler`); None until `fit` starts."""
    saved_scaler: dict[str, Any] | None = None
    """The loss scaler's state in the checkpoint this run resumed from."""
    average: nn.Module | None = None
    """The moving average of the weights (`fit`'s `ema_decay`); None until `fit` starts."""
    saved_average: dict[str, Any] | None = None
    """The average's weights in the checkpoint this run resumed from."""
    average_steps: int = 0
    """Steps folded into the average so far (its decay warms up with them)."""

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": unwrap(self.model).state_dict(),
            "optimizers": {name: o.state_dict() for name, o in self.optimizers.items()},
            "early_stopping": vars(self.early_stopping).copy(),
            "next_epoch": self.next_epoch,
            "history": list(self.history),
            "best_model": self.best_model_state,
            "first_train_loss": self.first_train_loss,
            "scaler": self.scaler.state_dict() if self.scaler is not None else self.saved_scaler,
            "average": (
                self.average.state_dict() if self.average is not None else self.saved_average
            ),
            "average_steps": self.average_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: weights, the optimizer's moments and the run's progress.
        The optimizer's settings (weight decay, momentum, betas) stay this run's own: a
        population-based-training trial takes a better trial's weights with its own
        mutated settings (a restart after a failure has the same settings anyway)."""
        unwrap(self.model).load_state_dict(state["model"])
        for name, optimizer in self.optimizers.items():
            settings = [
                {key: value for key, value in group.items() if key != "params"}
                for group in optimizer.param_groups
            ]
            optimizer.load_state_dict(state["optimizers"][name])
            for group, own in zip(optimizer.param_groups, settings, strict=True):
                group.update(own)
        vars(self.early_stopping).update(state["early_stopping"])
        self.next_epoch = state["next_epoch"]
        self.history = list(state["history"])
        self.best_model_state = state["best_model"]
        self.first_train_loss = state["first_train_loss"]
        self.saved_scaler = state.get("scaler")  # absent in checkpoints of older code
        self.saved_average = state.get("average")
        self.average_steps = state.get("average_steps", 0)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of a run with one (every task but the GAN)."""
        (only,) = self.optimizers.values()
        return only

    def evaluated_model(self) -> nn.Module:
        """What is validated and kept: the weights' moving average where there is one."""
        return self.average if self.average is not None else unwrap(self.model)


def moving_average(state: TrainingState, decay: float) -> nn.Module | None:
    """`state`'s moving average of the weights (decay > 0): a copy of the model, or of the
    checkpoint's average on a resumed run."""
    if decay <= 0:
        return None
    average = copy.deepcopy(unwrap(state.model)).eval()
    if state.saved_average is not None:
        average.load_state_dict(state.saved_average)
    average.requires_grad_(False)
    return average


@torch.no_grad()
def update_average(state: TrainingState, decay: float) -> None:
    """average <- d * average + (1 - d) * weights, d = min(decay, (1 + n) / (10 + n)) after
    n steps: the average starts as the untrained weights, and a fixed 0.99 would still hold
    74% of them after 30 steps; the warm-up (TensorFlow's ExponentialMovingAverage) lets a
    short run's average follow its training. Floating-point buffers (batch norm's running
    statistics) are averaged with the weights, so they describe the averaged network (as
    timm's ModelEmaV2 does); integer counters are copied."""
    average = state.average
    if average is None:
        return
    steps = state.average_steps
    d = min(decay, (1 + steps) / (10 + steps))
    model = unwrap(state.model)
    for mean, weight in zip(average.parameters(), model.parameters(), strict=True):
        mean.lerp_(weight.detach(), 1.0 - d)
    for mean, buffer in zip(average.buffers(), model.buffers(), strict=True):
        if mean.is_floating_point():  # batch norm's running statistics, averaged alike
            mean.lerp_(buffer, 1.0 - d)
        else:  # counters (num_batches_tracked)
            mean.copy_(buffer)
    state.average_steps = steps + 1


TIMING_KEYS = ("epoch_seconds", "train_seconds", "data_wait_seconds")
"""The wall-clock figures `fit` adds to each epoch's metrics (MLflow and the benchmarks
read them)."""


def without_timings(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """The run's per-epoch figures without their wall-clock times: what a model file keeps.
    A repeated run gives the same figures but other times, and DVC hashes the file."""
    return [{k: v for k, v in epoch.items() if k not in TIMING_KEYS} for epoch in history]


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model


Precision = Literal["fp32", "bf16", "fp16"]


def choose_precision(device_type: str, amp: bool, bf16_supported: bool) -> Precision:
    """The arithmetic of a run: bf16 autocast on a GPU that has bf16 units (Ampere and
    later), fp16 autocast (with a gradient scaler) on an older GPU, fp32 on CPU, where
    autocast would only slow training down, or when `amp` is off."""
    if not amp or device_type != "cuda":
        return "fp32"
    return "bf16" if bf16_supported else "fp16"


def precision_for(device: torch.device, amp: bool) -> Precision:
    """`choose_precision` for `device` as it is (asks CUDA whether bf16 is native)."""
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return choose_precision(device.type, amp, bf16)


_AUTOCAST_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """Autocast to `precision`'s dtype on `device`; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPE[precision])


def gradient_scaler(
    state: TrainingState, device: torch.device, precision: Precision
) -> torch.amp.GradScaler:
    """The run's gradient scaler: live for fp16, whose small range lets gradients underflow
    to zero unless the loss is scaled up first; a pass-through otherwise (bf16 has fp32's
    range). Continues the loss scale of a resumed run."""
    if state.scaler is None:
        state.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        if state.saved_scaler and state.scaler.is_enabled():
            state.scaler.load_state_dict(state.saved_scaler)
    return state.scaler


def batch_totals(
    output: torch.Tensor, target: torch.Tensor, loss: torch.Tensor, classification: bool
) -> torch.Tensor:
    """[loss * n, correct, n] for one batch, kept on the device (no host sync per step).

    For classification n counts the scored targets: every example, or in masked-LM
    training (output (B, T, V), target (B, T)) only the positions not set to IGNORE_INDEX."""
    if not classification:
        n = torch.tensor(float(target.shape[0]), device=output.device)
        correct = torch.zeros((), device=output.device)
    else:
        scored = target != IGNORE_INDEX
        n = scored.sum().to(torch.float32)
        correct = ((output.argmax(dim=-1) == target) & scored).sum().to(torch.float32)
    return torch.stack([loss.detach().float() * n, correct, n])


class Step(Protocol):
    """What one batch does, in training and in evaluation.

    Both return the batch's totals: `size` sums kept on the device (no host sync per
    step), added up over the epoch and over the workers (`fit`'s `reduce`) before `metrics`
    turns them into the epoch's figures. Those include `loss`, which early stopping and
    divergence detection read. `SupervisedStep` (model(x) -> loss(output, y)) serves every
    task but the generative models, which bring their own (pipelines/training/generative.py),
    and masked-LM pretraining, which scores only the masked positions (masking.py).
    A batch arrives on the device; `autocast()` opens a fresh autocast context."""

    size: int

    def train(
        self,
        model: nn.Module,
        batch: tuple[torch.Tensor, ...],
        optimizers: dict[str, torch.optim.Optimizer],
        autocast: Callable[[], contextlib.AbstractContextManager],
        scaler: torch.amp.GradScaler | None,
    ) -> torch.Tensor: ...

    def evaluate(
        self,
        model: nn.Module,
        batch: tuple[torch.Tensor, ...],
        autocast: Callable[[], contextlib.AbstractContextManager],
    ) -> torch.Tensor: ...

    def metrics(self, totals: torch.Tensor) -> dict[str, float]: ...


def train_step(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    autocast: Callable[[], contextlib.AbstractContextManager],
    classification: bool,
    weight: torch.Tensor | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One optimisation step; returns the batch totals [loss * n, correct, n].

    `weight` scales each example's loss (pseudo-labels during their ramp-up); `scaler`
    scales the loss for fp16 (see `gradient_scaler`)."""
    optimizer.zero_grad(set_to_none=True)
    with autocast():
        output = model(x)
        loss = loss_fn(output.float(), y, weight)
    backward_and_step(loss, optimizer, scaler)
    if scaler is not None and scaler.is_enabled():
        scaler.update()  # adjusts the scale after an overflow (or a run of clean steps)
    return batch_totals(output, y, loss, classification)


def backward_and_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    """Backpropagate `loss` and step `optimizer`: through `scaler` for fp16, which skips the
    step when the scaled gradients overflowed (the caller then runs `scaler.update()`)."""
    if scaler is None or not scaler.is_enabled():
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)


@torch.no_grad()
def eval_step(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    autocast: Callable[[], contextlib.AbstractContextManager],
    classification: bool,
) -> torch.Tensor:
    with autocast():
        output = model(x)
        loss = loss_fn(output.float(), y)
    return batch_totals(output, y, loss, classification)


@dataclass(frozen=True)
class SupervisedStep:
    """model(x) -> `loss_fn`(output, y), per-example weighted where a batch carries weights
    (x, y, weight); totals [loss * n, correct, n], figures `loss` (and `accuracy`)."""

    loss_fn: nn.Module
    classification: bool
    size = 3

    def train(self, model, batch, optimizers, autocast, scaler) -> torch.Tensor:
        x, y, *weight = batch
        (optimizer,) = optimizers.values()
        return train_step(
            model,
            x,
            y,
            self.loss_fn,
            optimizer,
            autocast,
            self.classification,
            weight[0] if weight else None,
            scaler,
        )

    def evaluate(self, model, batch, autocast) -> torch.Tensor:
        x, y, *_ = batch
        return eval_step(model, x, y, self.loss_fn, autocast, self.classification)

    def metrics(self, totals: torch.Tensor) -> dict[str, float]:
        loss_sum, correct, count = (float(v) for v in totals.cpu())
        metrics = {"loss": loss_sum / max(count, 1.0)}
        if self.classification:
            metrics["accuracy"] = correct / max(count, 1.0)
        return metrics


def gradient_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of each layer's weight gradient: small values in early layers mean vanishing gradients."""
    named = [
        (name.removesuffix(".weight"), p.grad)
        for name, p in unwrap(model).named_parameters()
        # `.weight`, and a recurrent layer's input and hidden weights (`weight_ih_l0`)
        if p.grad is not None and (name.endswith("weight") or ".weight_" in name)
    ]
    if not named:
        return {}
    norms = torch._foreach_norm([g for _, g in named])
    return {name: float(n) for (name, _), n in zip(named, norms)}


Batches = Iterable[tuple[torch.Tensor, ...]]  # (x, y) or (x, y, per-example weight)


class TimedBatches:
    """`batches`, counting in `seconds` the time spent waiting for the next one: the part of
    an epoch that data loading costs (host time: on a GPU, steps run ahead asynchronously)."""

    def __init__(self, batches: Batches) -> None:
        self.batches, self.seconds = batches, 0.0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        iterator = iter(self.batches)
        while True:
            asked = time.perf_counter()
            batch = next(iterator, None)
            self.seconds += time.perf_counter() - asked
            if batch is None:
                return
            yield batch


def run_epoch(
    model: nn.Module,
    batches: Batches,
    step: Step,
    device: torch.device,
    precision: Precision,
    optimizers: dict[str, torch.optim.Optimizer] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    after_step: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Train (with optimizers) or evaluate over `batches`; returns totals and gradient norms.
    `after_step` runs after every optimisation step (the weights' moving average)."""
    model.train(optimizers is not None)
    totals = torch.zeros(step.size, device=device)
    autocast = functools.partial(autocast_for, device, precision)  # a fresh context per step
    for batch in batches:  # (x, y) or (x, y, per-example weight)
        batch = tuple(t.to(device, non_blocking=True) for t in batch)
        if optimizers is None:
            totals += step.evaluate(model, batch, autocast)
        else:
            totals += step.train(model, batch, optimizers, autocast, scaler)
            if after_step is not None:
                after_step()
    # Gradients of the epoch's last step: a cheap, representative sample.
    norms = gradient_norms(model) if optimizers is not None else {}
    return totals, norms


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    """{"loss": 0.3} -> {"train_loss": 0.3}."""
    return {f"{prefix}_{name}": value for name, value in metrics.items()}


def scheduled_lr(
    epoch: int, lr: float, epochs: int, schedule: str = "constant", warmup_epochs: int = 0
) -> float:
    """The learning rate of `epoch` (0-based): a linear warm-up over `warmup_epochs`, then
    constant or a cosine decay that reaches 0 after the last epoch. A function of the epoch
    alone, so a run resumed from a checkpoint continues the same schedule."""
    if epoch < warmup_epochs:
        return lr * (epoch + 1) / (warmup_epochs + 1)
    if schedule == "constant":
        return lr
    progress = (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def initial_loss(
    model: nn.Module,
    batches: Batches,
    step: Step,
    device: torch.device,
    reduce: Callable[[torch.Tensor], torch.Tensor],
) -> float:
    """The untrained model's mean loss on the first training batch (over every worker, so
    all take the same decisions): the reference a diverging run is measured against. Not
    the first epoch's mean: a learning rate that blows the weights up in the first steps
    makes that mean enormous too (1e17 for SGD at lr 20 on the digits), and a batch-norm
    network then settles at a finite loss no later epoch exceeds 100 times.

    Its batch is drawn before the first epoch reseeds the generators: training is unchanged."""
    batch = tuple(t.to(device) for t in next(iter(batches)))
    network = unwrap(model)  # no DDP collective for one worker's forward pass
    network.eval()
    with torch.no_grad():
        totals = step.evaluate(network, batch, contextlib.nullcontext)
    return step.metrics(reduce(totals))["loss"]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's random draws: a function of the run's seed and the epoch only
    (not of how many epochs this process has run), so a restart cannot shift it."""
    return (seed * 1_000_003 + epoch) % 2**63


def fit(
    state: TrainingState,
    step: Step,
    train_batches: Callable[[int], Batches],
    val_batches: Callable[[], Batches],
    *,
    epochs: int,
    device: torch.device,
    precision: Precision = "fp32",
    divergence_factor: float = 100.0,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    on_epoch_end: Callable[[dict[str, float], TrainingState], None] | None = None,
    lr_at: Callable[[int], float] | None = None,
    lr_key: str = "train.lr",
    seed: int | None = None,
    ema_decay: float = 0.0,
) -> TrainingState:
    """Train from `state.next_epoch` to `epochs` with `step`, stopping early or on divergence.

    `train_batches(epoch)` yields the epoch's (shuffled) batches; `reduce` turns this
    worker's totals into the global ones, so every worker takes the same decisions.
    Raises TrainingDiverged when a loss becomes NaN/inf or the training loss exceeds
    `divergence_factor` times the untrained model's (`initial_loss`), naming `lr_key` (the params key the user
    lowers). `lr_at(epoch)`, when given, sets the learning rate of each epoch (see
    `scheduled_lr`); otherwise the optimizer keeps its own. Each epoch's metrics include its
    `train_seconds` and, of those, the `data_wait_seconds` spent waiting for batches.
    `seed`, when given, reseeds torch's generators (dropout, augmentation) at the start of
    every epoch from (seed, epoch): a run resumed from a checkpoint then draws the same
    numbers as one that was never stopped, and ends with the same weights (bit for bit on
    CPU; on a GPU, cuDNN's nondeterministic kernels may still differ in the last bits).
    `ema_decay` > 0 keeps a moving average of the weights (`state.average`), updated after
    every step: it is what is validated and kept as the best model.
    """
    if state.early_stopping.should_stop:  # resumed from the checkpoint that stopped the run
        return state
    scaler = gradient_scaler(state, device, precision)
    state.average = moving_average(state, ema_decay)
    after_step = (
        functools.partial(update_average, state, ema_decay) if state.average is not None else None
    )
    if state.first_train_loss is None:
        state.first_train_loss = initial_loss(
            state.model, train_batches(state.next_epoch), step, device, reduce
        )
    for epoch in range(state.next_epoch, epochs):
        started = time.perf_counter()
        if seed is not None:
            torch.manual_seed(epoch_seed(seed, epoch))
        if lr_at is not None:
            for optimizer in state.optimizers.values():
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(epoch)
        batches = TimedBatches(train_batches(epoch))
        train_totals, norms = run_epoch(
            state.model, batches, step, device, precision, state.optimizers, scaler, after_step
        )
        train_seconds = time.perf_counter() - started
        # Evaluate the bare module: DDP's forward may broadcast buffers, a collective that
        # would hang when workers hold different numbers of validation batches.
        val_totals, _ = run_epoch(state.evaluated_model(), val_batches(), step, device, precision)
        totals = reduce(torch.cat([train_totals, val_totals]))
        metrics = {
            "epoch": float(epoch),
            **prefixed("train", step.metrics(totals[: step.size])),
            **prefixed("val", step.metrics(totals[step.size :])),
            **{f"grad_norm/{name}": value for name, value in norms.items()},
            "lr": next(iter(state.optimizers.values())).param_groups[0]["lr"],
            "epoch_seconds": time.perf_counter() - started,
            "train_seconds": train_seconds,  # the training part of the epoch
            "data_wait_seconds": batches.seconds,  # the part of it spent waiting for batches
        }
        train_loss, val_loss = metrics["train_loss"], metrics["val_loss"]
        exploded = train_loss > divergence_factor * state.first_train_loss
        if not (math.isfinite(train_loss) and math.isfinite(val_loss)) or exploded:
            raise TrainingDiverged(
                f"training diverged at epoch {epoch}: train loss {train_loss:.4g}, val loss "
                f"{val_loss:.4g} (the untrained model's {state.first_train_loss:.4g}) with "
                f"learning rate {metrics['lr']:g} at that epoch; lower {lr_key}"
            )
        if state.early_stopping.update(metrics["val_loss"], epoch):
            state.best_model_state = copy.deepcopy(state.evaluated_model().state_dict())
        state.history.append(metrics)
        state.next_epoch = epoch + 1
        if on_epoch_end is not None:
            on_epoch_end(metrics, state)
        if state.early_stopping.should_stop:
            break
    return state
