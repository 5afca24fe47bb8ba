"""One trial of the search: a Ray Train run through the stages' own driver and worker.

Tune calls `run_trial` with a sample of the search space. It builds the trial's settings,
starts the same `run_training` the training stages use, and passes Tune a callback that
forwards every epoch's report, so the scheduler can stop the trial between epochs.
"""

from __future__ import annotations

from typing import Any

from models.architecture import ArchitectureConfig
from pipelines.config import TrainConfig, TuneConfig
from pipelines.training.driver import (
    loop_config,
    remove_local_run,
    run_training,
    supervised_task,
)
from pipelines.training.worker import train_loop_per_worker
from pipelines.tuning.space import trial_settings


def run_trial(
    sample: dict[str, Any],
    arrays: dict[str, Any],
    manifest: dict[str, Any],
    model: ArchitectureConfig,
    train: TrainConfig,
    tune: TuneConfig,
) -> None:
    from ray import tune as ray_tune
    from ray.tune.integration.ray_train import TuneReportCallback

    model_cfg, train_cfg = trial_settings(model, train, tune, sample)
    # The trial id names the Train run: a trial restarted by Tuner.restore resumes its own
    # run's latest checkpoint instead of starting over.
    name = f"tune-{ray_tune.get_context().get_trial_id()}"
    task = supervised_task(model_cfg, manifest, train_cfg)
    run_training(
        train_loop_per_worker,
        loop_config(arrays, task, train_cfg, logger=None),
        train_cfg,
        name,
        callbacks=[TuneReportCallback()],
    )
    remove_local_run(name)
