"""params.yaml section of the `tune` stage."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

from models.architecture import ArchitectureConfig
from models.optimizers import OPTIMIZERS
from pipelines.stagekit.config import Section, TrainConfig

TUNABLE_SECTIONS = ("train", "model")
"""Which params sections a search may set (`train.weight_decay`, `model.dropout`, ...)."""


@dataclass(frozen=True, repr=False)
class TuneConfig(Section):
    optimizers: tuple[str, ...] = OPTIMIZERS
    """Optimizers searched (default: the whole catalogue)."""
    lr: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {
            "default": (0.0003, 0.03),
            "gd": (0.03, 3.0),
            "sgd": (0.0001, 0.01),
            "minibatch_sgd": (0.003, 0.3),
            "momentum": (0.001, 0.1),
            "nesterov": (0.001, 0.1),
            "adagrad": (0.001, 0.1),
            "adadelta": (0.1, 10.0),
        }
    )
    """Learning-rate range [low, high] per optimizer, searched on a log scale; optimizers not
    listed use `default` (their families differ by orders of magnitude: full-batch gd wants
    ~1, per-example sgd ~1e-3, adadelta ~1)."""
    space: dict[str, tuple[float | str | bool, ...]] = field(
        default_factory=lambda: {
            "train.batch_size": (32, 64, 128),
            "train.weight_decay": (0.0, 0.0001, 0.001),
            "model.dropout": (0.0, 0.1, 0.3),
        }
    )
    """Other hyperparameters: dotted params key (`train.*` or `model.*`) -> the values to try:
    numbers, names (`model.kind: [lstm, gru, rnn]`, `model.activation: [relu, tanh]`) or
    true/false."""
    search: Literal["random", "grid", "optuna"] = "random"
    """random: every optimizer, `samples` learning rates each (log-uniform in its range) with
    random picks of `space`; grid: every optimizer x `samples` log-spaced learning rates x
    every combination of `space`; optuna: TPE over all of it (needs `pip install optuna`)."""
    samples: int = 2
    """Trials per optimizer (random, grid: learning rates per optimizer; optuna: x optimizers)."""
    scheduler: Literal["asha", "pbt", "none"] = "asha"
    """asha: stop trials early that trail at a rung; pbt: population based training, every
    `perturbation_interval` epochs a trailing trial takes a leading trial's weights and
    settings, with its learning rate and `train.*` `space` values perturbed; none: every trial runs
    `epochs`."""
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    """Validation metric the search optimizes (accuracy up, loss down)."""
    epochs: int = 16
    """Epochs per trial at most (ASHA's max_t)."""
    grace_period: int = 1
    """ASHA: epochs every trial gets before it can be stopped (one epoch already shows a
    learning rate that is far off)."""
    reduction_factor: int = 3
    """ASHA: 1/reduction_factor of the trials go on at each rung (rungs at grace_period x
    reduction_factor^n epochs: 1, 3, 9 by default; Ray's 4 leaves only 1 and 4 below 12
    epochs, and used more epochs on the default search: benchmarks/README.md)."""
    perturbation_interval: int = 4
    """PBT: epochs between the times a trailing trial may take a leading trial's weights."""
    synchronous: bool = False
    """PBT: every trial waits at each perturbation point until all have reached it, so they
    are compared at the same epoch (asynchronous, the default, compares a trial on arrival
    with the others' latest scores, which may be epochs behind, and leaves out finished
    ones: with few trials an exploit may never happen). For small searches whose trials
    all run at once (refused otherwise: Ray would run the rest as a second wave, compared
    only late), and not on resuming an interrupted search (Ray's scheduler starts anew and
    every trial would wait where it stopped). A trial that fails or ends itself on a
    diverging loss leaves the population and the others go on (pipelines/tuning/pbt.py)."""
    max_concurrent_trials: int = 2
    """Trials running at once (each takes `workers_per_trial` workers)."""
    workers_per_trial: int = 1
    """Ray Train workers per trial."""
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """Where trials train: auto takes GPU shares when the cluster has GPUs (sized so that
    `max_concurrent_trials` x `workers_per_trial` workers fit at once), else CPU."""
    seed: int = 0
    """Seed of the search (sampling) and of every trial's training."""
    experiment: str = "dlpipe-tune"
    """MLflow experiment: one parent run per search, one child run per trial."""

    def __post_init__(self) -> None:
        unknown = [o for o in self.optimizers if o not in OPTIMIZERS]
        if unknown or not self.optimizers:
            raise ValueError(
                f"optimizers: {unknown[0] if unknown else 'empty'!r} is not in the catalogue "
                f"({', '.join(OPTIMIZERS)})"
            )
        for name, (low, high) in self.lr.items():
            if name != "default" and name not in OPTIMIZERS:
                raise ValueError(f"lr.{name}: not an optimizer ({', '.join(OPTIMIZERS)})")
            if not 0 < low <= high:
                raise ValueError(f"lr.{name}: need 0 < low <= high, got [{low}, {high}]")
        if "default" not in self.lr and set(self.optimizers) - set(self.lr):
            raise ValueError("lr: give a `default` range or one for every optimizer searched")
        sections = (("train", TrainConfig), ("model", ArchitectureConfig))
        tunable = {section: {f.name for f in dataclasses.fields(cls)} for section, cls in sections}
        grouped = {  # nested settings such as train.augment
            section: {
                name
                for name, hint in typing.get_type_hints(cls).items()
                if dataclasses.is_dataclass(hint)
            }
            for section, cls in sections
        }
        for key, values in self.space.items():
            section, _, name = key.partition(".")
            if section not in TUNABLE_SECTIONS or name not in tunable[section]:
                raise ValueError(
                    f"space.{key}: not a train.* or model.* key (e.g. train.batch_size, "
                    "model.dropout)"
                )
            if name in ("optimizer", "lr", "epochs", "num_workers", "device", "seed"):
                raise ValueError(f"space.{key}: set by the search itself, not by `space`")
            if name in grouped[section]:
                raise ValueError(
                    f"space.{key}: a group of settings, not one value to search; set it in "
                    f"params.yaml ({key}: ...)"
                )
            if not values:
                raise ValueError(f"space.{key}: give at least one value")
        for name in (
            "samples",
            "epochs",
            "grace_period",
            "perturbation_interval",
            "max_concurrent_trials",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.scheduler == "pbt" and self.search == "optuna":
            raise ValueError(
                "scheduler: pbt picks the next settings itself and cannot follow a search "
                "algorithm; use search: random or grid with it"
            )
        if self.reduction_factor < 2:
            raise ValueError(f"reduction_factor must be >= 2, got {self.reduction_factor}")
        if self.workers_per_trial < 1:
            raise ValueError(f"workers_per_trial must be >= 1, got {self.workers_per_trial}")

    @property
    def mode(self) -> str:
        """Which way `metric` improves, as Tune spells it: max (accuracy) or min (loss)."""
        return "max" if self.metric == "val_accuracy" else "min"

    def lr_range(self, optimizer: str) -> tuple[float, float]:
        return self.lr.get(optimizer, self.lr.get("default", (0.0, 0.0)))


def workers_at_once(tune: TuneConfig) -> int:
    """Workers of every trial that runs at the same time: what the GPUs are shared among."""
    return tune.max_concurrent_trials * tune.workers_per_trial
