"""MLflow logging helpers against a real (SQLite) store."""

from mlflow.tracking import MlflowClient

from pipelines.stagekit import tracking


def test_params_and_metrics_with_class_names_in_their_keys(stores):
    stores()
    with tracking.stage_run("exp", "stage", {"dvc_stage": "x"}) as run:
        run.log_params({"round": {"pseudo_count/Crohn's (left)": 3}})
        run.log_metrics({"test_f1/Crohn's (left)": 0.5}, step=2)
    stored = MlflowClient(tracking.tracking_uri()).get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.params == {"round.pseudo_count/Crohn_s _left_": "3"}
    assert stored.data.metrics == {"test_f1/Crohn_s _left_": 0.5}


def test_an_interrupted_execution_is_continued_in_its_own_run(stores):
    from pipelines.training.driver import forget_run, interrupted_run, remember_run

    stores()
    assert interrupted_run("train-abc") is None
    try:
        with tracking.stage_run("exp", "stage", {}) as first:
            remember_run("train-abc", first.run_id)
            first.log_metrics({"val_loss": 1.0}, step=0)
            raise KeyboardInterrupt  # Ctrl-C (a SIGKILL leaves it RUNNING instead)
    except KeyboardInterrupt:
        pass
    assert interrupted_run("train-abc") == first.run_id
    with tracking.stage_run(
        "exp", "stage", {}, resume_run_id=interrupted_run("train-abc")
    ) as again:
        again.log_metrics({"val_loss": 0.5}, step=1)
    forget_run("train-abc")
    assert again.run_id == first.run_id and interrupted_run("train-abc") is None
    client = MlflowClient(tracking.tracking_uri())
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first.run_id, "val_loss")] == [0, 1]


def test_a_run_gone_from_the_store_is_replaced_by_a_new_one(stores):
    stores()
    with tracking.stage_run("exp", "stage", {}, resume_run_id="0" * 32) as run:
        pass
    assert run.run_id != "0" * 32
    assert MlflowClient(tracking.tracking_uri()).get_run(run.run_id).info.status == "FINISHED"


def test_the_spool_keeps_records_in_order_and_skips_a_line_cut_short(tmp_path, caplog):
    from pipelines.stagekit.spool import Spool

    kept = Spool(tmp_path / "spool")
    source = tmp_path / "curves.png"
    source.write_bytes(b"png")
    kept.append("run1", {"op": "metrics", "metrics": {"a": 1.0}})
    kept.append("run1", {"op": "artifact", "artifact_path": "plots"}, attach=source)
    source.write_bytes(b"changed later")
    with (tmp_path / "spool" / "run1.jsonl").open("a") as handle:
        handle.write('{"op": "metr')  # what a process killed mid-append leaves
    records = kept.records("run1")
    assert [r["op"] for r in records] == ["metrics", "artifact"]
    assert "cut short" in caplog.text
    copy = records[1]["file"]
    assert copy.endswith("/curves.png") and open(copy, "rb").read() == b"png"
    kept.keep_only("run1", records[1:])
    assert [r["op"] for r in kept.records("run1")] == ["artifact"]
    kept.keep_only("run1", [])
    assert kept.runs() == [] and not (tmp_path / "spool" / "run1.files").exists()


def test_messages_never_carry_tracking_credentials():
    from pipelines.stagekit.tracking import redacted, redacted_uri

    assert redacted_uri("http://alice:s3%40cr%2Ft@mlflow:5000/x") == "http://***@mlflow:5000/x"
    assert redacted_uri("http://mlflow:5000") == "http://mlflow:5000"
    message = "API request to http://alice:p@ss@10.0.0.1:5000/api failed (http://bob:x@h/)"
    assert "alice" not in redacted(message) and "bob" not in redacted(message)
    assert "10.0.0.1:5000/api" in redacted(message)


def test_only_an_unreachable_or_failing_server_is_an_outage():
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, TEMPORARILY_UNAVAILABLE

    from pipelines.stagekit.tracking import _unreachable

    def http_error(status: int) -> requests.HTTPError:
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(response=response)

    assert _unreachable(requests.ConnectionError("refused"))
    assert _unreachable(requests.Timeout("no answer"))
    assert _unreachable(MlflowException("db down", error_code=TEMPORARILY_UNAVAILABLE))
    assert _unreachable(http_error(502))
    # A refusal is not an outage: retrying it forever would hold back the run's records.
    assert not _unreachable(http_error(413))
    assert not _unreachable(MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not _unreachable(FileNotFoundError("spooled copy gone"))


def _open_store_at_once(uri: str, barrier) -> None:
    barrier.wait(timeout=60)
    tracking.create_store(uri)


def test_processes_opening_a_new_sqlite_store_at_once_all_succeed(tmp_path):
    """MLflow creates a new store's tables in whichever client opens it first, unlocked:
    without dlpipe's lock, 15 of 20 such processes failed ("table ... already exists")."""
    import multiprocessing

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    context = multiprocessing.get_context("spawn")  # fresh processes, as stages are
    barrier = context.Barrier(3)
    processes = [context.Process(target=_open_store_at_once, args=(uri, barrier)) for _ in range(3)]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=120)
    finally:  # none left for the test run's exit to wait on
        for process in processes:
            if process.is_alive():
                process.kill()
    assert [process.exitcode for process in processes] == [0, 0, 0]
    assert MlflowClient(uri).search_experiments()[0].name == "Default"
