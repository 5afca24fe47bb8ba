"""A real `mlflow server` killed while a stage logs to it, then started again on the same
port and store: nothing the stage wrote meanwhile may be lost, nothing sent twice, and the
stage must not wait on the dead server at every write. (The same fault during a real
training run: `make chaos`, fault tracking_server_down.)"""

from __future__ import annotations

import logging

import pytest
from mlflow import MlflowClient

from benchmarks.faults.tracking import TrackingServer
from pipelines.cli import main as dlpipe
from pipelines.stagekit import tracking
from pipelines.stagekit.spool import Spool

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def running_server(tmp_path_factory):
    with TrackingServer(tmp_path_factory.mktemp("tracking") / "server") as running:
        yield running


@pytest.fixture
def server(running_server, tmp_path, monkeypatch):
    """The module's server, up (a test before may have left it stopped), its own spool."""
    if not running_server.answers():
        running_server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", running_server.uri)
    monkeypatch.setenv("DLPIPE_TRACKING_SPOOL", str(tmp_path / "spool"))
    # One try per call (dlpipe's default retries for about 7 s): the same paths, faster.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    # This process's memory of an outage belongs to the test that caused it.
    monkeypatch.setattr(tracking, "_offline_until", {})
    return running_server


def _history(epochs: range) -> list[dict[str, float]]:
    return [
        {"epoch": float(e), "train_loss": 1.0 / (e + 1), "val_loss": 2.0 / (e + 1)} for e in epochs
    ]


def _a_stage_through_an_outage(server, tmp_path, back_before_end: bool) -> str:
    artifact = tmp_path / "curves.png"
    artifact.write_bytes(b"not really a png")
    with tracking.stage_run("dlpipe-outage", "train", {"dvc_stage": "train"}) as run:
        run.log_params({"train": {"lr": 0.01, "epochs": 6}})
        run.log_metrics({"val_loss": 2.0}, step=0)
        server.stop()
        for epoch in range(1, 4):
            run.log_metrics({"val_loss": 2.0 / (epoch + 1)}, step=epoch)
        run.set_tags({"ray_run": "train-abc"})
        if back_before_end:
            server.start()
            tracking._offline_until.clear()  # not 30 s of waiting: the next write tries
        run.log_history(_history(range(6)))
        run.log_metrics({"best_epoch": 5.0})
        run.log_artifact(artifact, "plots")
        artifact.write_bytes(b"changed after logging")  # what was logged must not change
    return run.run_id


def _assert_everything_arrived(uri: str, run_id: str) -> None:
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.01"
    assert run.data.tags["ray_run"] == "train-abc"
    assert run.data.metrics["best_epoch"] == 5.0
    # Steps 0-3 logged one by one, 4-5 added from the history, none twice.
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == list(range(6))
    assert sorted(m.step for m in client.get_metric_history(run_id, "train_loss")) == list(range(6))
    local = client.download_artifacts(run_id, "plots/curves.png")
    assert open(local, "rb").read() == b"not really a png"


def test_server_down_to_the_end_one_warning_then_sync_sends_everything(
    server, tmp_path, caplog, capsys
):
    with caplog.at_level(logging.INFO, logger="pipelines.stagekit.tracking"):
        run_id = _a_stage_through_an_outage(server, tmp_path, back_before_end=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "dlpipe tracking sync" in warnings[0] and run_id in warnings[0]
    kept = Spool(tmp_path / "spool")
    assert kept.runs() == [run_id]
    ops = [r["op"] for r in kept.records(run_id)]
    assert ops == ["metrics"] * 3 + ["tags", "history", "metrics", "artifact", "end"]

    assert dlpipe_exit("tracking", "sync") == 1  # still down: says so, keeps everything
    assert kept.runs() == [run_id]

    server.start()
    tracking._offline_until.clear()
    assert dlpipe_exit("tracking", "sync") == 0
    assert f"run {run_id}: 8 record(s) sent, none left" in capsys.readouterr().out
    assert kept.runs() == []
    _assert_everything_arrived(server.uri, run_id)


def test_server_back_during_the_stage_gets_the_kept_records_first(server, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipelines.stagekit.tracking"):
        run_id = _a_stage_through_an_outage(server, tmp_path, back_before_end=True)
    assert not caplog.records  # nothing left waiting: no warning
    assert Spool(tmp_path / "spool").runs() == []
    _assert_everything_arrived(server.uri, run_id)


def test_without_a_spool_a_write_says_unavailable_and_no_stage_starts_on_a_dead_server(server):
    with tracking.stage_run("dlpipe-outage", "train", {}) as run:
        worker_side = tracking.RunLogger(run.run_id, run.uri)  # as a Train worker holds it
        server.stop()
        with pytest.raises(tracking.TrackingUnavailable):
            worker_side.log_metrics({"val_loss": 1.0}, step=0)
        with pytest.raises(tracking.TrackingUnavailable):  # within OFFLINE_S: no new try
            worker_side.log_metrics({"val_loss": 0.5}, step=1)
    tracking._offline_until.clear()
    with pytest.raises(tracking.UserError, match="does not answer.*unset MLFLOW_TRACKING_URI"):
        with tracking.stage_run("dlpipe-outage", "train", {}):
            pass


def dlpipe_exit(*argv: str) -> int:
    with pytest.raises(SystemExit) as ended:
        dlpipe(list(argv))
    return ended.value.code
