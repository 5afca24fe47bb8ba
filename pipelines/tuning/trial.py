"""One trial of the search: a Ray Train run through the stages' own driver and worker.

Tune calls `run_trial` with a sample of the search space. It builds the trial's settings
and starts the same `run_training` the training stages use; every epoch's report reaches
Tune, so the scheduler can stop the trial (ASHA) between epochs.

The Train run goes on a thread and its reports are handed to Tune from the trial's own
thread (`train_reports`), for every scheduler. Not Ray's `TuneReportCallback`, for two
reasons. Under PBT, Tune must hold each trial's checkpoints (it restarts a trailing trial
from a leading trial's), and that callback forwards only a checkpoint's path. And in Ray
2.60 it can deadlock a trial: its reports go through a queue that the trial actor's main
thread drains by reporting to itself, and when the Train run ends while a report still
waits there (a Tune driver slowed down, e.g. by a tracking server behind a password), that
thread blocks on its own full result queue for good (seen as a hung search in
tests/cluster/test_team_tracking.py). ASHA and no scheduler report metrics only: a
restored search resumes a trial from its Train run's own folder.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from ray.train.v2.api.callback import UserCallback

from models.architecture import ArchitectureConfig
from pipelines.stagekit.config import TrainConfig
from pipelines.training.driver import (
    loop_config,
    remove_local_run,
    run_training,
    supervised_task,
)
from pipelines.training.worker import train_loop_per_worker
from pipelines.tuning.config import TuneConfig, workers_at_once
from pipelines.tuning.space import trial_settings

REPORT_WAIT_S = 1.0


def run_trial(
    sample: dict[str, Any],
    arrays: dict[str, Any],
    manifest: dict[str, Any],
    model: ArchitectureConfig,
    train: TrainConfig,
    tune: TuneConfig,
) -> None:
    from ray import tune as ray_tune

    model_cfg, train_cfg = trial_settings(model, train, tune, sample)
    task = supervised_task(model_cfg, manifest, train_cfg)
    config = loop_config(arrays, task, train_cfg, logger=None, lr_key="tune.lr")
    config["progress_bars"] = False  # the search draws one bar of trials, not one per trial
    config["report_every_epoch"] = True  # the schedulers count reports as epochs
    # The trial id names the Train run: a trial restarted by Tuner.restore resumes its own
    # run's latest checkpoint instead of starting over.
    name = f"tune-{ray_tune.get_context().get_trial_id()}"
    start = ray_tune.get_checkpoint()
    if start is not None:
        # PBT restarts the trial from a checkpoint Tune holds (a leading trial's, or its own
        # last one in a restored search): a new Train run from it, never the trial's old run.
        name = f"{name}-{uuid.uuid4().hex[:8]}"
        config["initial_checkpoint"] = start

    def train_run(callbacks: list[Any]) -> None:
        run_training(
            train_loop_per_worker,
            config,
            train_cfg,
            name,
            callbacks=callbacks,
            workers_at_once=workers_at_once(tune),
        )

    hold_checkpoints = tune.scheduler == "pbt"
    for metrics, checkpoint in train_reports(train_run):
        held = None
        if hold_checkpoints and checkpoint is not None:
            held = ray_tune.Checkpoint(checkpoint.path, checkpoint.filesystem)
        ray_tune.report(metrics, checkpoint=held)
    remove_local_run(name)


def train_reports(train_run: Callable[[list[Any]], None]) -> Iterator[tuple[dict, Any]]:
    """Run `train_run(callbacks)` on a thread and yield its reports (rank 0's metrics and
    checkpoint, each epoch) here, as they come. The Train run waits until the consumer
    asks for the next report, so a checkpoint is read (Tune copies it) before Train's
    `num_to_keep` deletes it. An error in the run is raised here once its reports are out.
    """
    from ray.util.queue import Empty, Queue

    # Queues, not a local object: the callback runs in the Train run's controller actor.
    reports: Queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    taken: Queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    failure: list[BaseException] = []

    def run() -> None:
        try:
            train_run([ForwardReports(reports, taken)])
        except BaseException as exc:  # raised in the consumer's thread below
            failure.append(exc)
        try:
            reports.put(None)
        except Exception:  # the trial is being stopped: nobody is listening
            pass

    thread = threading.Thread(target=run, name="train-run", daemon=True)
    thread.start()
    # Tune stopping or pausing the trial ends this generator at its `yield`; the queues, the
    # Train run and its thread then go with the trial's actor, which owns them.
    while True:
        try:
            report = reports.get(timeout=REPORT_WAIT_S)
        except Empty:
            continue
        if report is None:
            break
        yield report
        taken.put(True)
    thread.join()
    for queue in (reports, taken):
        queue.shutdown()
    if failure:
        raise failure[0]


class ForwardReports(UserCallback):
    """A Ray Train callback (it runs in the run's controller) that puts each report on
    `reports` and waits on `taken` until the trial has handed it to Tune."""

    def __init__(self, reports: Any, taken: Any) -> None:
        self.reports, self.taken = reports, taken

    def after_report(self, run_context: Any, metrics: list[dict], checkpoint: Any) -> None:
        self.reports.put((dict(metrics[0]), checkpoint))
        self.taken.get()
