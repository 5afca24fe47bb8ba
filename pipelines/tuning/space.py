"""The search space declared in params.yaml (`tune`), and a trial's settings from a sample.

The learning rate is searched as `lr_scale` in [0, 1], mapped onto the log range of the
trial's optimizer: one search dimension serves every optimizer family although their good
rates differ by orders of magnitude, and random, grid and Optuna search it alike.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

import numpy as np

from models.architecture import ArchitectureConfig
from pipelines.stagekit.config import TrainConfig
from pipelines.stagekit.errors import UserError
from pipelines.tuning.config import TuneConfig

LR_SCALE = "lr_scale"
SECTIONS: dict[str, type] = {"train": TrainConfig, "model": ArchitectureConfig}


def param_space(tune: TuneConfig) -> dict[str, Any]:
    """Tune's `param_space`: optimizer, lr_scale and every `space` key."""
    from ray import tune as ray_tune

    optimizers = list(tune.optimizers)
    if tune.search == "grid":
        scales = [0.5] if tune.samples == 1 else np.linspace(0, 1, tune.samples).tolist()
        return {
            "optimizer": ray_tune.grid_search(optimizers),
            LR_SCALE: ray_tune.grid_search(scales),
            **{key: ray_tune.grid_search(list(v)) for key, v in tune.space.items()},
        }
    # Random search runs the optimizer grid `samples` times, so each optimizer is sampled;
    # Optuna cannot take a grid dimension and picks the optimizer like any other choice.
    pick = ray_tune.grid_search if tune.search == "random" else ray_tune.choice
    return {
        "optimizer": pick(optimizers),
        LR_SCALE: ray_tune.uniform(0.0, 1.0),
        **{key: ray_tune.choice(list(v)) for key, v in tune.space.items()},
    }


def num_samples(tune: TuneConfig) -> int:
    """Tune's `num_samples` (grid dimensions multiply it)."""
    if tune.search == "grid":
        return 1
    if tune.search == "random":
        return tune.samples
    return tune.samples * len(tune.optimizers)


def learning_rate(tune: TuneConfig, optimizer: str, scale: float) -> float:
    low, high = tune.lr_range(optimizer)
    return float(low * (high / low) ** scale)


def clip_lr_scale(config: dict[str, Any]) -> dict[str, Any]:
    """PBT's `custom_explore_fn`: its perturbation multiplies lr_scale by 0.8 or 1.2; keep it
    in [0, 1], the optimizer's learning-rate range."""
    config[LR_SCALE] = min(max(float(config[LR_SCALE]), 0.0), 1.0)
    return config


def trial_settings(
    model: ArchitectureConfig, train: TrainConfig, tune: TuneConfig, sample: dict[str, Any]
) -> tuple[ArchitectureConfig, TrainConfig]:
    """The model and training settings of one trial: the stage's own, overridden by the
    sample. Early stopping is off in trials: the scheduler decides who stops."""
    overrides: dict[str, dict[str, Any]] = {"train": {}, "model": {}}
    for key, value in sample.items():
        section, _, name = key.partition(".")
        if section in SECTIONS:
            overrides[section][name] = _typed(SECTIONS[section], name, value)
    overrides["train"].update(
        optimizer=sample["optimizer"],
        lr=learning_rate(tune, sample["optimizer"], sample[LR_SCALE]),
        epochs=tune.epochs,
        num_workers=tune.workers_per_trial,
        device=tune.device,
        seed=tune.seed,
        early_stopping_patience=0,
    )
    try:
        return (
            dataclasses.replace(model, **overrides["model"]),
            dataclasses.replace(train, **overrides["train"]),
        )
    except ValueError as exc:
        raise UserError(f"tune: the sample {sample} makes invalid settings: {exc}") from None


def check_space(model: ArchitectureConfig, train: TrainConfig, tune: TuneConfig) -> None:
    """Fail before the search starts on a value no trial could use (e.g. batch size 0)."""
    for optimizer in tune.optimizers:
        trial_settings(model, train, tune, {"optimizer": optimizer, LR_SCALE: 0.0})
    for key, values in tune.space.items():
        for value in values:
            sample = {"optimizer": tune.optimizers[0], LR_SCALE: 0.0, key: value}
            try:
                trial_settings(model, train, tune, sample)
            except UserError:
                raise UserError(f"tune.space.{key}: {value!r} is not a valid value") from None


def tuned_values(sample: dict[str, Any], tune: TuneConfig) -> dict[str, dict[str, Any]]:
    """The settings a trial's sample chose, as params sections ({'train': {...}, 'model': ...})."""
    chosen: dict[str, dict[str, Any]] = {
        "train": {
            "optimizer": sample["optimizer"],
            "lr": learning_rate(tune, sample["optimizer"], sample[LR_SCALE]),
        }
    }
    for key, value in sample.items():
        section, _, name = key.partition(".")
        if section in SECTIONS:
            chosen.setdefault(section, {})[name] = _typed(SECTIONS[section], name, value)
    return chosen


def _typed(cls: type, name: str, value: Any) -> Any:
    """A `space` value as its field takes it: numbers are read as floats, so an int field
    (batch size) gets an int back; a name (model.kind) must be one the field allows."""
    hint = typing.get_type_hints(cls).get(name)
    key = f"tune.space: {cls.__name__}.{name}"
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        if not numeric or float(value) != int(value):
            raise UserError(f"{key} must be a whole number, got {value!r}")
        return int(value)
    if hint is float and not numeric:
        raise UserError(f"{key} must be a number, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise UserError(f"{key} must be true or false, got {value!r}")
    if typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
        choices = ", ".join(map(str, typing.get_args(hint)))
        raise UserError(f"{key} must be one of {choices}, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise UserError(f"{key} must be a name, got {value!r}")
    return value
