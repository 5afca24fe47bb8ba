"""One trial of the search: the training stages' own worker loop on a sample of the space.

Tune calls `run_trial` with a sample of the search space. It builds the trial's settings
and runs the same loop the training stages use (`pipelines.training.worker.run_worker`);
every epoch's report reaches Tune, so the scheduler can stop the trial (ASHA) or restart it
from a leading trial's checkpoint (PBT) between epochs.

A trial of one worker (`tune.workers_per_trial: 1`, the default) runs the loop in the
trial's own actor, which Tune already placed on a CPU (or GPU share): a Ray Train job would
add a controller and a worker actor to start and import torch in, about 20 s a trial on
2 CPUs, more than a small trial's training. Its reports and checkpoints go straight to Tune,
which also resumes it (a restored search, a failed trial) from its last checkpoint.

A trial of several workers is a Ray Train run through the stages' own driver
(`run_training`): DDP across its workers, restarts from the run's own folder. Its reports
are handed to Tune from the trial's own thread (`train_reports`), for every scheduler. Not
Ray's `TuneReportCallback`, for two reasons. Under PBT, Tune must hold each trial's
checkpoints (it restarts a trailing trial from a leading trial's), and that callback
forwards only a checkpoint's path. And in Ray 2.60 it can deadlock a trial: its reports go
through a queue that the trial actor's main thread drains by reporting to itself, and when
the Train run ends while a report still waits there (a Tune driver slowed down, e.g. by a
tracking server behind a password), that thread blocks on its own full result queue for
good (seen as a hung search in tests/cluster/test_team_tracking.py). ASHA and no scheduler
report metrics only: a restored search resumes such a trial from its Train run's folder.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import torch
from ray.train.v2.api.callback import UserCallback

from models.architecture import ArchitectureConfig
from pipelines.stagekit.config import TrainConfig
from pipelines.training.cluster import Placement
from pipelines.training.driver import (
    loop_config,
    remove_local_run,
    run_training,
    supervised_task,
)
from pipelines.training.worker import run_worker, train_loop_per_worker
from pipelines.tuning.config import TuneConfig, workers_at_once
from pipelines.tuning.space import trial_settings

REPORT_WAIT_S = 1.0
TRIAL_MEMORY = 2**20  # bytes, logical


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
    if trains_in_trial_actor(tune):
        run_worker(config, TrialSession())
        return
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


def trains_in_trial_actor(tune: TuneConfig) -> bool:
    """Whether a trial trains in its own actor (one worker) rather than in a Train run."""
    return tune.workers_per_trial == 1


def trial_resources(tune: TuneConfig, placed: Placement) -> dict[str, float]:
    """What Tune reserves for each trial's actor. A one-worker trial trains there: the
    worker's CPU or GPU share. A Train run's workers hold their own resources, so that
    trial only waits on them: a token of memory and no CPU (with even 0.01 CPU each, two
    trials of one worker would not fit on two CPUs at once)."""
    if trains_in_trial_actor(tune):
        return {"GPU": placed.gpus_per_worker} if placed.use_gpu else {"CPU": 1}
    return {"CPU": 0, "memory": TRIAL_MEMORY}


class TrialSession:
    """The worker session of a one-worker trial (see `WorkerSession`): rank 0 of 1 in the
    trial's actor, its reports and checkpoints to Tune."""

    rank, world_size = 0, 1

    def device(self) -> torch.device:
        import ray

        # Ray points CUDA_VISIBLE_DEVICES at the actor's GPU share, if it has one.
        return torch.device("cuda") if ray.get_gpu_ids() else torch.device("cpu")

    def prepare_model(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return model.to(device)

    def latest_checkpoint(self) -> Any:
        from ray import tune as ray_tune

        return ray_tune.get_checkpoint()

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        from ray import tune as ray_tune

        checkpoint = ray_tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray_tune.report(metrics, checkpoint=checkpoint)


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
