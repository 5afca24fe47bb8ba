"""Killing a Ray Train worker mid-run: the run restarts from its latest checkpoint and finishes."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from models.architecture import ArchitectureConfig
from pipelines.stagekit.dataset import load_prepared
from pipelines.training.driver import (
    loop_config,
    run_training,
    supervised_arrays,
    supervised_task,
)
from pipelines.training.worker import train_loop_per_worker
from tests.integration.conftest import quick_train_config

pytestmark = pytest.mark.integration


def train_worker_pids() -> list[int]:
    """Processes of Ray Train workers, found by the process title Ray gives its actors."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if b"RayTrainWorker" in cmdline:
                pids.append(int(proc.name))
    return pids


def test_killed_worker_resumes_from_checkpoint(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("DLPIPE_STORAGE", str(tmp_path))
    # Small batches: each epoch takes long enough for the kill to land mid-run.
    train = quick_train_config(epochs=14, batch_size=8, max_failures=2, early_stopping_patience=0)
    data = load_prepared(trained.prepared)
    config = loop_config(
        supervised_arrays(data),
        supervised_task(ArchitectureConfig(), data.manifest, train),
        train,
        None,
    )
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = run_training(train_loop_per_worker, config, train, "killed-worker")
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=fit)
    thread.start()
    run_dir = tmp_path / "killed-worker"
    deadline = time.monotonic() + 180
    while not list(run_dir.glob("checkpoint_*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(run_dir.glob("checkpoint_*")), "no checkpoint was written"
    time.sleep(1.0)  # let a couple more epochs pass
    victims = train_worker_pids()
    assert victims, "no Ray Train worker process found"
    os.kill(victims[-1], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    metrics = outcome["result"].metrics
    assert metrics["epoch"] == 13  # finished every epoch
    assert metrics["attempt_start_epoch"] >= 1  # ...after restarting from a checkpoint, not epoch 0
