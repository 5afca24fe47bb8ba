"""A stage's driver process killed outright (SIGKILL: no handler runs, as when a machine
or a container dies) in the middle of training, then the stage run again with
`dvc repro`, as a user would.

What must hold: the re-run resumes from the last checkpoint (not from epoch 0), its final
figure is within 1 point of an undisturbed run with the same seed, and its MLflow run
shows one continuous curve (every epoch once, the interrupted execution's run continued,
not a second one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

from benchmarks.workspace import Workspace

POLL_S = 0.5


@dataclass(frozen=True)
class TrainingStage:
    stage: str
    """The dvc.yaml stage that trains (its driver is killed)."""
    judged_by: str
    """The stage whose metrics file holds the figure compared (it may be `stage` itself)."""
    metrics_file: str
    figure: str
    experiment: str
    epochs_key: str
    """Where params.yaml sets the epochs, e.g. "train" or "mlm.train"."""


SUPERVISED = TrainingStage(
    "train_supervised",
    "evaluate",
    "metrics/evaluate.json",
    "test_accuracy",
    "dlpipe-supervised",
    "train",
)
MLM = TrainingStage(
    "pretrain_mlm", "pretrain_mlm", "metrics/mlm.json", "masked_accuracy", "dlpipe-mlm", "mlm.train"
)


def driver_killed(
    ws: Workspace, spec: TrainingStage, epochs: int, kill_after: int
) -> dict[str, Any]:
    """Train `spec.stage` undisturbed, then again with fresh checkpoint storage, SIGKILL its
    process group once `kill_after` epochs are checkpointed, re-run it; compare."""
    ws.edit_params(lambda p: _section(p, spec.epochs_key).update(epochs=epochs))
    # The undisturbed run in a copy: in this workspace the disturbed run is the stage's
    # first, as for a user (DVC would otherwise restore the undisturbed run's outputs
    # from its lock entry instead of running the stage again).
    baseline = ws.copy(ws.root.with_name(f"{ws.root.name}-{spec.stage}-undisturbed"))
    baseline.dvc("repro", spec.judged_by)
    undisturbed = json.loads((baseline.root / spec.metrics_file).read_text())[spec.figure]
    shutil.rmtree(baseline.root)
    runs_before = {r.info.run_id for r in _stage_runs(ws, spec)}

    storage = str(ws.root / "storage-disturbed")
    started = time.monotonic()
    process = ws.start([*_dvc(), "repro", spec.stage], DLPIPE_STORAGE=storage)
    run_id = _wait_for_epochs(ws, spec, runs_before, kill_after, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = time.monotonic()
    # The Train workers outlive their killed driver for a moment (until Ray reaps them):
    # what they checkpointed meanwhile counts as done before the kill.
    _wait_for_free_cpus(ws)
    logged_at_kill = len(_steps(ws, run_id, "val_loss"))
    attempts_at_kill = len(_values(ws, run_id, "attempt_start_epoch"))

    rerun_started = time.monotonic()
    rerun = ws.start([*_dvc(), "repro", spec.judged_by], DLPIPE_STORAGE=storage)
    recovery_s = None  # until the re-run's first epoch is logged
    while rerun.poll() is None:
        if (
            recovery_s is None
            and len(_values(ws, run_id, "attempt_start_epoch")) > attempts_at_kill
        ):
            recovery_s = round(time.monotonic() - rerun_started, 1)
        time.sleep(POLL_S)
    output = rerun.stdout.read()
    if rerun.returncode != 0:
        raise RuntimeError(f"the re-run of {spec.stage} failed:\n{output[-4000:]}")
    disturbed = json.loads((ws.root / spec.metrics_file).read_text())[spec.figure]

    new_runs = [r for r in _stage_runs(ws, spec) if r.info.run_id not in runs_before]
    steps = _steps(ws, run_id, "val_loss")
    starts = [int(v) for v in _values(ws, run_id, "attempt_start_epoch")][attempts_at_kill:]
    resumed_from = max(starts, default=0)  # the epoch the re-run's attempt started at
    epochs_lost = logged_at_kill - resumed_from
    delta = disturbed - undisturbed
    continuous = sorted(steps) == list(range(epochs)) and len(steps) == epochs
    one_run = [r.info.run_id for r in new_runs] == [run_id]
    return {
        "met": bool(
            resumed_from > 0 and epochs_lost <= 1 and abs(delta) <= 0.01 and continuous and one_run
        ),
        "target": "re-run resumes from the last checkpoint, figure within 1 point of an "
        "undisturbed run, one MLflow run with every epoch once",
        "figure": spec.figure,
        "undisturbed": round(undisturbed, 4),
        "disturbed": round(disturbed, 4),
        "accuracy_delta": round(delta, 4),
        "epochs": epochs,
        "epochs_checkpointed_at_kill": logged_at_kill,
        "resumed_from_epoch": resumed_from,
        "epochs_lost": epochs_lost,
        "recovery_s": recovery_s,
        "killed_after_s": round(killed_at - started, 1),
        "rerun_ran": re.findall(r"Running stage '(\w+)'", output),
        "mlflow_runs": len(new_runs),
        "mlflow_curve_continuous": continuous,
        **({} if resumed_from > 0 else {"rerun_output_tail": output[-800:]}),
    }


def _dvc() -> list[str]:
    return [sys.executable, "-m", "dvc"]


def _section(params: dict[str, Any], dotted: str) -> dict[str, Any]:
    for key in dotted.split("."):
        params = params[key]
    return params


def _client(ws: Workspace):
    from mlflow import MlflowClient

    return MlflowClient(ws.env["MLFLOW_TRACKING_URI"])


def _stage_runs(ws: Workspace, spec: TrainingStage) -> list[Any]:
    client = _client(ws)
    experiment = client.get_experiment_by_name(spec.experiment)
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.dvc_stage = '{spec.stage}'",
        order_by=["attributes.start_time ASC"],
    )


def _steps(ws: Workspace, run_id: str, key: str) -> list[int]:
    return [m.step for m in _client(ws).get_metric_history(run_id, key)]


def _values(ws: Workspace, run_id: str, key: str) -> list[float]:
    return [m.value for m in _client(ws).get_metric_history(run_id, key)]


def _wait_for_epochs(
    ws: Workspace, spec: TrainingStage, runs_before: set[str], epochs: int, process: Any
) -> str:
    """The new run's id once it has `epochs` epochs logged; an epoch is logged to MLflow
    after its checkpoint is stored (pipelines/training/worker.py)."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"{spec.stage} ended before {epochs} epochs:\n{process.stdout.read()[-4000:]}"
            )
        for run in _stage_runs(ws, spec):
            if run.info.run_id not in runs_before:
                if len(_steps(ws, run.info.run_id, "val_loss")) >= epochs:
                    return run.info.run_id
        time.sleep(POLL_S)
    raise RuntimeError(f"{spec.stage}: {epochs} epochs not logged within 900 s")


def _wait_for_free_cpus(ws: Workspace, timeout_s: float = 60) -> None:
    """Ray reclaims a killed driver's actors (its Train controller and workers) shortly."""
    import ray

    total = ray.cluster_resources().get("CPU", 0)
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < total and time.monotonic() < deadline:
        time.sleep(POLL_S)


def tune_driver_killed(ws: Workspace, kill_after: int = 2) -> dict[str, Any]:
    """`dvc repro tune` SIGKILLed once `kill_after` of its 4 trials (one at a time) have
    finished, then run again: the search must be restored and no finished trial run again.
    Each trial's MLflow run must end with its full curve, one run per trial."""

    def small_search(params: dict[str, Any]) -> None:
        params["tune"].update(
            optimizers=["adam", "rmsprop", "adagrad", "momentum"],
            samples=1,
            epochs=3,
            scheduler="none",
            max_concurrent_trials=1,
            space={"train.batch_size": [32]},
        )

    ws.edit_params(small_search)
    started = time.monotonic()
    process = ws.start([*_dvc(), "repro", "tune"])
    finished: set[str] = set()
    deadline = time.monotonic() + 900
    while len(finished) < kill_after:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"tune ended or stalled early:\n{process.stdout.read()[-4000:]}")
        finished = {r.data.tags["tune_trial_id"] for r in _trials(ws, status="completed")}
        time.sleep(POLL_S)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_after = time.monotonic() - started
    _wait_for_free_cpus(ws)
    finished = {r.data.tags["tune_trial_id"] for r in _trials(ws, status="completed")}

    rerun_started = time.monotonic()
    rerun = ws.run([*_dvc(), "repro", "tune"])
    rerun_s = time.monotonic() - rerun_started
    log = rerun.stdout
    restored = "resuming the interrupted search" in log
    ran_again = sorted(t for t in finished if f"trial {t} started" in log)
    summary = json.loads((ws.root / "metrics" / "tune.json").read_text())
    trials = _trials(ws)
    client = _client(ws)
    full_curves = sum(
        len(client.get_metric_history(r.info.run_id, "val_loss")) == 3 for r in trials
    )
    return {
        "met": restored and not ran_again and summary["trials"] == 4 and full_curves == 4,
        "target": "the search restored; no finished trial run again; one MLflow run per "
        "trial, each with its full curve",
        "trials": summary["trials"],
        "finished_before_kill": len(finished),
        "finished_trials_run_again": len(ran_again),
        "search_restored": restored,
        "mlflow_trial_runs": len(trials),
        "trial_runs_with_full_curve": full_curves,
        "killed_after_s": round(killed_after, 1),
        "rerun_s": round(rerun_s, 1),
    }


def _trials(ws: Workspace, status: str | None = None) -> list[Any]:
    client = _client(ws)
    experiment = client.get_experiment_by_name("dlpipe-tune")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [
        r
        for r in runs
        if "mlflow.parentRunId" in r.data.tags
        and (status is None or r.data.tags.get("status") == status)
    ]
