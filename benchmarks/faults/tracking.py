"""The MLflow tracking server goes away while a stage trains.

A real `mlflow server` on loopback (SQLite behind it, artifacts proxied through it) is
stopped with SIGKILL in the middle of `dvc repro train_supervised`:
- `back`: it is started again once the training has met the outage (the worker says so),
  on the same port and store, while the stage still trains. Training must finish and every
  figure reach the run (kept on the stage's side meanwhile, then sent), with no warning.
- `stays_down`: it is started again only after the stage has ended. The stage must end
  with its outputs saved and one warning, and `dlpipe tracking sync` must then send
  everything.
Measured: metrics lost (epochs in the model's history the run lacks, summary figures and
artifacts missing), warnings printed, the stage's exit code.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.faults.serving import free_port
from benchmarks.workspace import Workspace

POLL_S = 0.5


class TrackingServer:
    """`mlflow server` on 127.0.0.1 over a SQLite file and an artifact folder in `root`;
    `stop` kills it (SIGKILL: as a crashed host would), `start` brings it back on the same
    port and store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = (self.root / "server.log").open("a")
        mlflow = str(Path(sys.executable).with_name("mlflow"))
        self.process = subprocess.Popen(
            [
                mlflow, "server",
                "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                "--artifacts-destination", str(self.root / "artifacts"),
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            if self.process.poll() is not None:
                raise RuntimeError((self.root / "server.log").read_text()[-3000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer within {timeout_s} s")
            time.sleep(POLL_S)

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.uri}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def __enter__(self) -> TrackingServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_down(ws: Workspace, epochs: int, back_epochs: int, down_after: int) -> dict[str, Any]:
    """Both cases (module docstring), each in its own copy of `ws` with its own server;
    `back` trains `back_epochs` (long enough to outlast the server's restart)."""
    back = _one_outage(ws, "back", back_epochs, down_after)
    stays_down = _one_outage(ws, "stays_down", epochs, down_after)
    return {
        "met": bool(
            all(
                case["stage_exit_code"] == 0
                and case["outputs_saved"]
                and case["metrics_lost"] == 0
                and case["run_status"] == "FINISHED"
                for case in (back, stays_down)
            )
            and back["server_back_before_stage_ended"]
            and back["warnings"] == 0
            and stays_down["warnings"] == 1
            and stays_down["sync"]["exit_code"] == 0
        ),
        "target": "training finishes; every epoch, figure and artifact reaches the run "
        "(server back mid-run), or one warning and `dlpipe tracking sync` sends them "
        "(server back after the stage)",
        "back": back,
        "stays_down": stays_down,
    }


def _one_outage(ws: Workspace, case: str, epochs: int, down_after: int) -> dict[str, Any]:
    copy = ws.copy(ws.root.with_name(f"{ws.root.name}-tracking-{case}"))
    copy.edit_params(lambda p: p["train"].update(epochs=epochs))
    with TrackingServer(copy.root / "tracking-server") as server:
        env = {"MLFLOW_TRACKING_URI": server.uri, "DLPIPE_STORAGE": str(copy.root / "storage")}
        copy.dvc("repro", "prepare")  # the stages before training, with the server up
        process = copy.start([sys.executable, "-m", "dvc", "repro", "train_supervised"], **env)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
        reader.start()
        run_id = _wait_for_epochs(server.uri, down_after, process, lines)
        server.stop()
        down_at = time.monotonic()
        if case == "back":  # once the training has met the outage, while it still trains
            _wait_for_line(lines, "MLflow does not answer", process)
            server.start()
            back_before_end = process.poll() is None
        process.wait(timeout=1800)
        reader.join()
        output = "".join(lines)
        outage_s = round(time.monotonic() - down_at, 1)
        if case == "stays_down":
            server.start()
        synced = None
        if case == "stays_down":
            sync = copy.run([sys.executable, "-m", "pipelines.cli", "tracking", "sync"],
                            check=False, **env)  # fmt: skip
            synced = {"exit_code": sync.returncode, "output": sync.stdout.strip()[-400:]}
        found = _what_reached(server.uri, run_id, copy)
    warnings = [line for line in output.splitlines() if line.startswith("warning:")]
    lost = found["epochs_missing"] + found["summary_missing"] + found["artifacts_missing"]
    return {
        "stage_exit_code": process.returncode,
        "outputs_saved": (copy.root / "artifacts/supervised/model").is_dir(),
        "server_down_s": outage_s,
        **({"server_back_before_stage_ended": back_before_end} if case == "back" else {}),
        "metrics_lost": lost,
        **found,
        "warnings": len(warnings),
        "warning_lines": [w[-300:] for w in warnings],
        **({"sync": synced} if synced else {}),
        **({} if process.returncode == 0 and lost == 0 else {"output_tail": output[-3000:]}),
    }


def _wait_for_epochs(uri: str, epochs: int, process: subprocess.Popen, lines: list[str]) -> str:
    """The training run's id once it has `epochs` epochs logged."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            time.sleep(1)  # the reader thread takes the last lines
            tail = "".join(lines)[-3000:]
            raise RuntimeError(f"training ended before {epochs} epochs were logged:\n{tail}")
        experiment = client.get_experiment_by_name("dlpipe-supervised")
        if experiment is not None:
            for run in client.search_runs([experiment.experiment_id]):
                if run.data.tags.get("dvc_stage") == "train_supervised":
                    if len(client.get_metric_history(run.info.run_id, "val_loss")) >= epochs:
                        return run.info.run_id
        time.sleep(POLL_S)
    raise RuntimeError(f"{epochs} epochs not logged within 900 s")


def _wait_for_line(lines: list[str], text: str, process: subprocess.Popen) -> None:
    """Until the stage prints a line containing `text`, or ends."""
    deadline = time.monotonic() + 900
    while process.poll() is None and time.monotonic() < deadline:
        if any(text in line for line in list(lines)):
            return
        time.sleep(POLL_S)


def _what_reached(uri: str, run_id: str, ws: Workspace) -> dict[str, Any]:
    """What of the run the server has, against the model file's own history and the
    stage's metrics file."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    with (ws.root / "plots/supervised/learning_curves.csv").open() as curves:
        epochs = {int(float(row["epoch"])) for row in csv.DictReader(curves)}
    logged = {m.step for m in client.get_metric_history(run_id, "val_loss")}
    summary = json.loads((ws.root / "metrics/train_supervised.json").read_text())
    artifacts = {a.path for a in client.list_artifacts(run_id, "plots")}
    expected = {"plots/learning_curves.png", "plots/gradient_norms.png"}
    return {
        "epochs_in_history": len(epochs),
        "epochs_missing": len(epochs - logged),
        "summary_missing": len([k for k in summary if k not in run.data.metrics]),
        "artifacts_missing": len(expected - artifacts),
        "params": len(run.data.params),
        "run_status": run.info.status,
    }
