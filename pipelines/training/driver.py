"""The one place a `TorchTrainer` is built. Training stages and Ray Tune both call it.

It turns a `TrainConfig` into Ray's Scaling/Run/Failure configs, ships the arrays through
the object store (so workers on other nodes get them without shared disk), and names the
run after its inputs so that re-running an interrupted stage resumes its checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.architecture import ArchitectureConfig
from pipelines.stagekit.config import TrainConfig
from pipelines.stagekit.dataset import PreparedData
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.progress import on_terminal
from pipelines.stagekit.tracking import RunLogger, redacted
from pipelines.training.cluster import Placement
from pipelines.training.tasks import SupervisedTask, Task

if TYPE_CHECKING:
    from ray.train import Result

log = logging.getLogger(__name__)


def storage_path() -> str:
    """Where checkpoints go: DLPIPE_STORAGE (s3://..., NFS) or ./ray_results."""
    return os.environ.get("DLPIPE_STORAGE") or str(Path("ray_results").resolve())


def code_fingerprint() -> str:
    """Hash of the code that defines the networks and the training loop."""
    import models
    import pipelines.training

    digest = hashlib.sha256()
    for package in (models, pipelines.training):
        for source in sorted(Path(package.__file__).parent.rglob("*.py")):
            digest.update(source.read_bytes())
    return digest.hexdigest()


def run_name(stage: str, *parts: Any) -> str:
    """`stage-<hash of its inputs and code>`: only an identical re-run resumes the checkpoints
    of an interrupted one (a checkpoint from other code or params might not even load)."""
    payload = json.dumps([code_fingerprint(), *parts], sort_keys=True, default=str)
    return f"{stage}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def placement(train: TrainConfig, device_key: str, workers_at_once: int = 0) -> Placement:
    """Where `train.num_workers` workers go (see `place_workers`); fails early, naming
    `train.num_workers`, when a local cluster could never place that many CPU workers."""
    from pipelines.training.cluster import place_workers, require_resources

    placed = place_workers(train.device, train.num_workers, device_key, workers_at_once)
    if not placed.use_gpu:
        key = device_key.replace(".device", ".num_workers")
        what = f"{key}={train.num_workers}"
        require_resources("CPU", train.num_workers, what, f"lower {key}")
    return placed


def supervised_arrays(data: PreparedData) -> dict[str, np.ndarray]:
    """The arrays a supervised run trains on: train and validation splits (never test)."""
    return {
        "x_train": data.x("train"),
        "y_train": data.y("train"),
        "x_val": data.x("val"),
        "y_val": data.y("val"),
    }


def loop_config(
    arrays: dict[str, np.ndarray],
    task: Task,
    train: TrainConfig,
    logger: RunLogger | None,
    lr_key: str = "train.lr",
) -> dict[str, Any]:
    """The `train_loop_config` the worker adapter expects. `train` crosses to the workers
    as the frozen dataclass it is; `lr_key` is the params key a diverged run tells the user
    to lower (e.g. `mlm.train.lr`).

    `arrays` holds x_train/y_train/x_val/y_val as the task reads them, optionally
    `pseudo_train` (a mask of pseudo-labeled examples) and `x_predict` (examples to predict
    with the final model, e.g. an unlabeled pool).
    """
    import ray

    from pipelines.training.cluster import connect_ray

    connect_ray()
    return {
        "data": ray.put(arrays),  # one copy in the object store, read zero-copy by workers
        "task": task,
        "train": train,
        "lr_key": lr_key,
        "mlflow": {"run_id": logger.run_id, "uri": logger.uri} if logger else None,
        # Decided here, where a person may be watching: a worker's output is never a terminal.
        "progress_bars": on_terminal(),
    }


def supervised_task(
    arch: ArchitectureConfig,
    manifest: dict[str, Any],
    train: TrainConfig,
    pseudo: dict[str, float] | None = None,
) -> SupervisedTask:
    """The supervised task of `arch` on data described by `manifest`, with `train`'s loss
    (and its augmentation, for images)."""
    augment = train.augment if manifest["input_kind"] == "image" else None
    return SupervisedTask(arch, manifest, train.loss, train.huber_delta, pseudo, augment)


def run_training(
    train_loop: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    train: TrainConfig,
    name: str,
    callbacks: list[Any] | None = None,
    workers_at_once: int = 0,
) -> Result:
    """Run `train_loop` on `train.num_workers` Ray Train workers; returns the ray.train.Result.
    `callbacks` are Ray Train callbacks, e.g. a trial's report forwarding (pipelines/tuning/trial.py);
    `workers_at_once` the workers of every run that shares the GPUs with this one (a
    search's concurrent trials), for sizing GPU shares."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.training.cluster import connect_ray

    # Ray Train V2 hands each report to the controller on its health-check tick (2 s by
    # default), and a worker's next report waits for the last to be taken: an epoch
    # shorter than the tick lasts a tick. Measured with 50 ms epochs on 2 CPUs: 200 ms
    # each at a 0.2 s tick, 56 ms at 0.05 s, whose polling costs the training 3%. The
    # FixMatch stage's supervised baseline (990 epochs of 47 ms) spent 2.5 minutes there.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.05")
    # Without this, every print on a worker reaches the console twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    connect_ray()
    # The section of the run's settings (train, mlm.train, tune): its lr_key's.
    device_key = config["lr_key"].rsplit(".", 1)[0] + ".device"
    placed = placement(train, device_key, workers_at_once)
    log.info("%s: %s", name, placed.summary)
    # NCCL refuses two ranks on one GPU; gloo all-reduces CUDA tensors too (more slowly).
    shared_gpu = placed.use_gpu and placed.gpus_per_worker < 1 and train.num_workers > 1
    resources = {"GPU": placed.gpus_per_worker} if placed.use_gpu else None
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config,
        torch_config=TorchConfig(backend="gloo" if shared_gpu else None),
        scaling_config=ScalingConfig(
            num_workers=train.num_workers, use_gpu=placed.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path(),
            failure_config=FailureConfig(max_failures=train.max_failures),
            # The latest checkpoint is all a restart needs; the best weights live inside it.
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )
    return trainer.fit()


class RunDiverged(UserError):
    """The run's loss diverged; the message names the epoch and the learning rate."""


@dataclass(frozen=True)
class FinishedRun:
    state: dict[str, Any]
    """The worker's TrainingState.state_dict() after the last epoch."""
    predictions: np.ndarray | None
    """Class probabilities for `x_predict`, when the run was given one."""


def finished_run(result: Result, name: str) -> FinishedRun:
    """Read a finished run's last checkpoint, then drop its local folder (the run is over:
    a later run with the same name must start afresh). Raises RunDiverged if it diverged."""
    import torch

    from pipelines.training.worker import DIVERGED_FILE, PREDICTIONS_FILE, STATE_FILE

    with result.checkpoint.as_directory() as directory:
        directory = Path(directory)
        if (directory / DIVERGED_FILE).exists():
            message = (directory / DIVERGED_FILE).read_text()
            remove_local_run(name)
            forget_run(name)
            raise RunDiverged(message)
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        predictions_file = directory / PREDICTIONS_FILE
        predictions = np.load(predictions_file) if predictions_file.exists() else None
    remove_local_run(name)
    forget_run(name)
    return FinishedRun(state, predictions)


def train_job(
    arrays: dict[str, np.ndarray],
    task: Task,
    train: TrainConfig,
    name: str,
    logger: RunLogger | None = None,
    lr_key: str = "train.lr",
) -> FinishedRun:
    """One Ray Train job, start to finish: `task` trained on `arrays` (see `loop_config`)
    with `train`'s settings as Ray run `name`, logged to `logger`'s MLflow run; returns the
    finished state. A diverged run (its message names `lr_key`) tags the MLflow run `diverged` and raises RunDiverged.
    Every training stage runs its jobs through here (Tune trials, which read the reports
    as they come instead of the finished run, call `run_training` themselves)."""
    from pipelines.training.worker import train_loop_per_worker

    result = run_training(
        train_loop_per_worker, loop_config(arrays, task, train, logger, lr_key), train, name
    )
    try:
        finished = finished_run(result, name)
    except RunDiverged:
        if logger is not None:
            logger.set_tags({"diverged": "true"})
        raise
    if logger is not None:
        # Every epoch the run lacks: the worker's own writes may have met a tracking outage.
        # (An outage is spooled; a refusal, e.g. the run deleted meanwhile, must not fail
        # a stage whose training is done and whose checkpoints are already gone.)
        try:
            logger.log_history(finished.state["history"])
        except Exception as exc:
            log.warning("the MLflow run did not take the epochs' figures: %s", redacted(str(exc)))
    return finished


def interrupted_run(name: str) -> str | None:
    """The MLflow run of an earlier execution of Ray run `name` that did not finish (killed,
    crashed, Ctrl-C), as `remember_run` recorded it beside the checkpoints: a re-run resumes
    those checkpoints and logs on to that run, so the run keeps one continuous curve."""
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(_run_marker(name))
    try:
        with filesystem.open_input_stream(path) as marker:
            return marker.read().decode().strip() or None
    except (FileNotFoundError, OSError):
        return None


def remember_run(name: str, run_id: str) -> None:
    """Record that MLflow run `run_id` tracks Ray run `name` until it finishes."""
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(_run_marker(name))
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as marker:
        marker.write(run_id.encode())


def forget_run(name: str) -> None:
    """The run finished: a later execution with the same inputs starts a new MLflow run."""
    from pyarrow import fs

    filesystem, path = fs.FileSystem.from_uri(_run_marker(name))
    try:
        filesystem.delete_file(path)
    except (FileNotFoundError, OSError):
        pass


def _run_marker(name: str) -> str:
    return f"{storage_path().rstrip('/')}/{name}.mlflow_run"


def remove_local_run(name: str) -> None:
    """Drop a finished run's local checkpoints (remote storage is left to its own lifecycle)."""
    root = storage_path()
    if "://" not in root:
        shutil.rmtree(Path(root) / name, ignore_errors=True)
