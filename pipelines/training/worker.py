"""The per-worker adapter: what Ray Train runs on each worker around the plain `fit` loop.

It adds exactly the distributed parts: DDP via `prepare_model`, this worker's shard of the
data, an all-reduce of epoch totals, `ray.train.report` with a checkpoint every epoch,
resuming from the latest checkpoint after a failure, and MLflow logging from rank 0.
The Ray calls among them go through a `WorkerSession`, so that a one-worker Tune trial runs
the same loop in its own actor (pipelines/tuning/trial.py says why).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from pipelines.stagekit.config import TrainConfig
from pipelines.stagekit.plots import sample_grid_png
from pipelines.stagekit.tracking import RunLogger, TrackingUnavailable
from pipelines.training.fitting import EVAL_BATCH_SIZE, ddp_options, fit_task, initial_state
from pipelines.training.loop import TrainingDiverged, TrainingState, precision_for

STATE_FILE = "state.pt"
REPORT_EVERY_S = 2.0
"""Ray Train hands a report to its controller on the controller's tick, and a worker's next
report waits for the last to be taken: reported every epoch, a run of 40 ms epochs spent
60 ms an epoch waiting (the FixMatch stage's supervised baseline: 990 such epochs). A
failed worker resumes from the last report's checkpoint, so at most this much is redone."""
PREDICTIONS_FILE = "predictions.npy"
DIVERGED_FILE = "diverged.txt"
DIVERGED_METRICS_FILE = "diverged.json"


class WorkerSession(Protocol):
    """What the loop needs from whatever runs it: its place among the workers, its device,
    the model wrapping, the checkpoint to resume from, and where a report goes.

    Two run it: a Ray Train worker (`RayTrainSession`, every training stage and a search's
    multi-worker trials) and a one-worker Tune trial's own actor
    (`pipelines.tuning.trial.TrialSession`), which skips a Train job's fixed start-up."""

    rank: int
    world_size: int

    def device(self) -> torch.device: ...

    def prepare_model(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module: ...

    def latest_checkpoint(self) -> Any:
        """The run's own latest checkpoint (a restart after a failure), or None."""
        ...

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        """Hand `metrics` on, with the checkpoint in `checkpoint_dir` (read before this
        returns) when given."""
        ...


class RayTrainSession:
    """A Ray Train worker's session: ranks, device, DDP wrapping and reports from ray.train."""

    def __init__(self) -> None:
        _quiet_per_report_log()
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def device(self) -> torch.device:
        return ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        return ray.train.torch.prepare_model(
            model, move_to_device=device, parallel_strategy_kwargs=ddp_options(model)
        )

    def latest_checkpoint(self) -> Any:
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None = None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` is built by `pipelines.training.driver.loop_config`,
    its `task` (see tasks.py) says which network, loss and batches to train."""
    run_worker(config, RayTrainSession())


def run_worker(config: dict[str, Any], session: WorkerSession) -> None:
    """The loop around `fit` for one worker of a run (see `train_loop_per_worker`), whatever
    `session` runs it."""
    rank, world_size = session.rank, session.world_size
    train_cfg: TrainConfig = config["train"]
    task = config["task"]
    classification = task.classification
    device = session.device()
    if device.type == "cuda" and not torch.cuda.is_available():
        # Ray reserved a GPU (share) for this worker, but torch here cannot use one: a CPU
        # build of torch on a GPU node, or a cluster that declares GPUs it lacks. Training
        # on CPU beats failing; the line says what to fix.
        print(
            f"warning: rank {rank} was given GPU {ray.get_gpu_ids()} but torch "
            f"{torch.__version__} here has no CUDA; training on CPU",
            flush=True,
        )
        device = torch.device("cpu")

    arrays = {k: _shared_tensor(v) for k, v in ray.get(config["data"]).items()}

    state = initial_state(task, train_cfg, lambda model: session.prepare_model(model, device))
    # The run's own latest checkpoint (a restart after a failure), else the one the run was
    # started from (`initial_checkpoint`: e.g. a Tune trial restarted by PBT from a better
    # trial's weights).
    checkpoint = session.latest_checkpoint() or config.get("initial_checkpoint")
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            if (Path(directory) / DIVERGED_FILE).exists():
                # The run had diverged (and was restarted before it ended, e.g. a Tune trial
                # of a restored search): it diverges again, without training again.
                message = (Path(directory) / DIVERGED_FILE).read_text()
                metrics = json.loads((Path(directory) / DIVERGED_METRICS_FILE).read_text())
                _report_diverged(session, rank, message, metrics)
                return
            state.load_state_dict(
                torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)
            )
    start_epoch = state.next_epoch

    logger = RunLogger(**config["mlflow"]) if rank == 0 and config.get("mlflow") else None
    placement = _placement_tags(device, world_size, precision_for(device, train_cfg.amp))
    if rank == 0:
        print(f"workers: {placement['worker_devices']}; precision {placement['precision']}")
        if logger is not None:  # tags, not params: a restart may land on other nodes
            _tracked(lambda: logger.set_tags(placement))
    if logger is not None and state.history:
        # A resumed run: make sure the MLflow run has the curves of the epochs before it.
        _tracked(lambda: logger.log_history(state.history))

    def all_reduce(totals: torch.Tensor) -> torch.Tensor:
        if world_size > 1:
            dist.all_reduce(totals)
        return totals

    bar = (
        _epoch_bar(train_cfg.epochs, start_epoch)
        if rank == 0 and config.get("progress_bars")
        else None
    )

    # Epochs not yet reported: a report (and its checkpoint) goes out at most every
    # REPORT_EVERY_S, or every epoch where the run's reports pace a search (Tune's ASHA and
    # PBT count them), and after the last epoch (`report_pending`).
    every_epoch = bool(config.get("report_every_epoch"))
    unreported: list[dict[str, float]] = []
    last_report = time.monotonic()

    def report_pending(state: TrainingState) -> None:
        nonlocal last_report
        if not unreported:
            return
        metrics = unreported[-1]
        if rank != 0:
            session.report(metrics)
        else:
            with tempfile.TemporaryDirectory() as directory:
                torch.save(state.state_dict(), Path(directory) / STATE_FILE)
                session.report(metrics, directory)
            # After the checkpoint, not before: killed in between, a resumed run logs these
            # epochs from the checkpoint's history (above), instead of training them again
            # and logging them twice.
            if logger is not None:
                rows = list(unreported)
                _tracked(lambda: logger.log_history(rows))
        unreported.clear()
        last_report = time.monotonic()

    def on_epoch_end(metrics: dict[str, float], state: TrainingState) -> None:
        metrics = {**metrics, "attempt_start_epoch": float(start_epoch)}
        unreported.append(metrics)
        if rank == 0:
            if bar is not None:
                # Short: tqdm keeps the ETA only if the line fits the terminal.
                shown = {k: metrics[k] for k in ("val_loss", "val_accuracy") if k in metrics}
                bar.set_description("epochs " + " ".join(f"{k} {v:.3f}" for k, v in shown.items()))
                bar.update(1)
            else:
                print(_progress_line(metrics, train_cfg.epochs), flush=True)
            epoch = int(metrics["epoch"]) + 1
            every = getattr(task, "sample_every", 0)  # generative tasks: a grid of samples
            if logger is not None and every and (epoch % every == 0 or epoch == train_cfg.epochs):
                images = task.samples(state.evaluated_model()).numpy()
                _tracked(lambda: _log_sample_grid(logger, images, epoch))
        due = every_epoch or time.monotonic() - last_report >= REPORT_EVERY_S
        if not every_epoch and world_size > 1:
            # Every worker must make the same reports (each is a barrier across them):
            # reported when any worker's clock says so.
            due = bool(all_reduce(torch.tensor([float(due)], device=device))[0] > 0)
        if due:
            report_pending(state)

    try:
        fit_task(
            state,
            task,
            arrays,
            train_cfg,
            device,
            rank,
            world_size,
            all_reduce,
            on_epoch_end,
            lr_key=config["lr_key"],
        )
        report_pending(state)  # the epochs since the last report, the last one's weights
        if "x_predict" in arrays:
            probabilities = predict_distributed(
                state.evaluated_model(), arrays["x_predict"], device, rank, world_size
            )
            if rank == 0:
                with tempfile.TemporaryDirectory() as directory:
                    torch.save(state.state_dict(), Path(directory) / STATE_FILE)
                    np.save(Path(directory) / PREDICTIONS_FILE, probabilities)
                    session.report(state.history[-1], directory)
            else:
                session.report(state.history[-1])
    except TrainingDiverged as exc:
        # Reported, not raised: a retry from the checkpoint would diverge again. It travels
        # in a checkpoint because Ray Train's Result keeps the metrics of checkpointed reports.
        # The validation figures at their worst, so a search ranks a diverged run last.
        metrics = {
            "diverged": 1.0,
            "epoch": float(state.next_epoch),
            "val_loss": float("inf"),
            **({"val_accuracy": 0.0} if classification else {}),
        }
        if rank == 0 and logger is not None and unreported:  # the curve up to the divergence
            _tracked(lambda: logger.log_history(unreported))
        _report_diverged(session, rank, str(exc), metrics)
    finally:
        if bar is not None:
            bar.close()


def _report_diverged(
    session: WorkerSession, rank: int, message: str, metrics: dict[str, float]
) -> None:
    """Report a diverged run: its metrics, and from rank 0 a checkpoint holding the message
    and those metrics (no weights: nothing should resume from them)."""
    if rank != 0:
        session.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        (Path(directory) / DIVERGED_FILE).write_text(message)
        (Path(directory) / DIVERGED_METRICS_FILE).write_text(json.dumps(metrics))
        session.report(metrics, directory)


@torch.no_grad()
def predict_distributed(
    model: torch.nn.Module, x: torch.Tensor, device: torch.device, rank: int, world_size: int
) -> np.ndarray | None:
    """Class probabilities for `x`: each worker predicts every world_size-th example and rank 0
    gathers them back in order (None on the other ranks)."""
    model.eval()
    shard = x[rank::world_size]
    chunks = [
        torch.softmax(model(shard[i : i + EVAL_BATCH_SIZE].to(device)).float(), dim=1).cpu()
        for i in range(0, len(shard), EVAL_BATCH_SIZE)
    ]
    mine = torch.cat(chunks).numpy() if chunks else np.zeros((0, 0), dtype=np.float32)
    if world_size == 1:
        return mine
    gathered: list = [None] * world_size
    dist.all_gather_object(gathered, mine)
    return interleave_shards(gathered, len(x)) if rank == 0 else None


def interleave_shards(parts: list[np.ndarray], total: int) -> np.ndarray:
    """Undo the x[rank::world_size] sharding: row i of the result came from worker i % world."""
    world_size = len(parts)
    width = max(p.shape[1] for p in parts if len(p))
    full = np.zeros((total, width), dtype=np.float32)
    for worker, part in enumerate(parts):
        if len(part):
            full[worker::world_size] = part
    return full


def _placement_tags(device: torch.device, world_size: int, precision: str) -> dict[str, str]:
    """Where every rank runs, gathered from all of them (on every rank): `worker_nodes`,
    Ray node ids in rank order; `worker_devices`, "rank@node-ip:device" for people;
    `precision`, the run's arithmetic (fp32 / bf16 / fp16)."""
    context = ray.get_runtime_context()
    gpus = ray.get_gpu_ids()
    where = f"{device} (GPU {','.join(map(str, gpus))} reserved)" if gpus else str(device)
    mine = (context.get_node_id(), ray.util.get_node_ip_address(), where)
    places: list = [mine]
    if world_size > 1:
        places = [None] * world_size
        dist.all_gather_object(places, mine)
    return {
        "worker_nodes": ",".join(node for node, _, _ in places),
        "worker_devices": ", ".join(
            f"{rank}@{ip}:{where}" for rank, (_, ip, where) in enumerate(places)
        ),
        "precision": precision,
    }


_told_unreachable = False


def _tracked(call) -> None:
    """Run an MLflow call; a tracking outage is reported once, never allowed to stop the
    training. Nothing is lost: the driver logs every epoch of the final checkpoint's
    history that the run lacks (driver.train_job)."""
    global _told_unreachable
    try:
        call()
    except TrackingUnavailable:
        if not _told_unreachable:
            _told_unreachable = True
            print(
                "MLflow does not answer: training goes on; the epochs missing from the run "
                "are logged from the checkpoint's history at the end",
                flush=True,
            )
    except Exception as exc:  # any other MLflow or network error is non-fatal here too
        print(f"warning: MLflow logging failed ({exc}); training continues", flush=True)


def _log_sample_grid(logger: RunLogger, images: np.ndarray, epoch: int) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"epoch_{epoch:03d}.png"
        sample_grid_png(images, path)
        logger.log_artifact(path, "samples")


def _shared_tensor(array) -> torch.Tensor:
    """Wrap a read-only object-store array without copying it (the loop only reads inputs)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _quiet_per_report_log() -> None:
    """Silence Ray Train's INFO line per report (it prints the whole metrics dict each epoch).

    That logger is named after its file, so `LoggingConfig(log_level=...)`, which filters
    the `ray.train` logger tree, does not reach it.
    """
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # internal layout changed: keep the noise rather than fail
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _epoch_bar(epochs: int, start_epoch: int) -> Any:
    """A bar Ray draws on the driver's terminal (pipelines/stagekit/progress.py says why)."""
    from ray.experimental.tqdm_ray import tqdm as ray_tqdm

    bar = ray_tqdm(desc="epochs", total=epochs, unit="epoch")
    if start_epoch:
        bar.update(start_epoch)  # a resumed run
    return bar


def _progress_status(metrics: dict[str, float]) -> str:
    return "  ".join(
        f"{key} {metrics[key]:.4f}"
        for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy")
        if key in metrics
    )


def _progress_line(metrics: dict[str, float], epochs: int) -> str:
    return (
        f"epoch {int(metrics['epoch']) + 1}/{epochs}  {_progress_status(metrics)}  "
        f"({metrics['epoch_seconds']:.2f}s)"
    )
