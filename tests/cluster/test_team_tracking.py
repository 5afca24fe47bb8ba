"""A team's MLflow server: PostgreSQL (Debian's package) behind `mlflow server`, started by
infra/mlflow/local-server.sh exactly as the README's cluster guide says. Three stage
processes log to it at once, as three people would: training -> evaluate -> export (a
model version and its alias), a Tune search with 2 trials at a time, and a pseudo-label
run. Every run, metric, version and alias must arrive, with no lock or retry error.

The server runs MLflow's basic-auth app: a request without the password is refused, the
stages log with it (MLFLOW_TRACKING_USERNAME / _PASSWORD), and the password shows up in no
stage's output and no run's params or tags."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.helpers import REPO, free_port

pytestmark = pytest.mark.integration

SERVER_SCRIPT = REPO / "infra/mlflow/local-server.sh"
TUNE_TRIALS = 2
TRAIN_EPOCHS = 2
ADMIN, PASSWORD = "admin", "team-tracking-pw-5e1c9a"
CREDENTIALS = {"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": PASSWORD}


@pytest.fixture(scope="module")
def tracking_server():
    """infra/mlflow/local-server.sh on a fresh folder; yields the tracking URI."""
    # Not under pytest's tmp folder: PostgreSQL runs as the `postgres` user, who must reach it.
    root = Path(tempfile.mkdtemp(prefix="dlpipe-mlflow-"))
    root.chmod(0o755)
    port = free_port()
    log = (root / "server.log").open("w")
    server = subprocess.Popen(
        [str(SERVER_SCRIPT), str(root), str(free_port()), str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
        },
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the MLflow server did not answer in 120 s"
            time.sleep(0.5)
        yield uri, root
    finally:
        server.terminate()
        server.wait(timeout=30)
        subprocess.run([str(SERVER_SCRIPT), "--stop", str(root)], check=False)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def own_ray():
    """A Ray of this module's, declaring 8 CPUs on the 2 here: 2 training workers, 4 trials
    and 2 pseudo-label workers all at once (slower, but truly concurrent). Started with the
    tracking credentials in its environment, as a cluster's nodes would be: the Train
    workers log to the server themselves."""
    import ray

    with pytest.MonkeyPatch.context() as env:
        for name, value in CREDENTIALS.items():
            env.setenv(name, value)
        context = ray.init(num_cpus=8, logging_level="WARNING")
    yield context.address_info["gcs_address"]
    ray.shutdown()


def small_params(path: Path) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    # Short runs: what is under test is concurrent logging, not the models (two epochs of
    # training: a metric history of more than one step). One worker per run: rank 0 alone
    # logs, and fewer processes share the 2 CPUs.
    params["train"].update(epochs=TRAIN_EPOCHS, num_workers=1)
    params["tune"].update(
        optimizers=["adam", "momentum"],
        samples=1,  # 2 optimizers x 1 learning rate: 2 trials at once
        scheduler="none",
        epochs=1,
        max_concurrent_trials=TUNE_TRIALS,
    )
    params["pseudolabel"].update(
        rounds=0, epochs_per_round=1, fixmatch_epochs=1, labeled_fraction=0.1
    )
    path.write_text(yaml.safe_dump(params))
    return path


def test_three_stages_log_to_the_postgres_server_at_once(
    tracking_server, own_ray, digits_folder, tmp_path, monkeypatch
):
    import mlflow

    from pipelines.supervised.config import PrepareConfig
    from pipelines.supervised.prepare import prepare

    uri, server_root = tracking_server
    refused = httpx.get(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert refused.status_code == 401  # the basic-auth app is on
    params = small_params(tmp_path / "params.yaml")
    data = tmp_path / "prepared"
    prepare(PrepareConfig(), str(digits_folder), str(data))
    out = tmp_path / "out"
    py = f"{sys.executable} -m pipelines"
    p = f"--params {params}"
    commands = {
        "supervised": (
            f"{py}.supervised.train {p} --data {data} --output {out}/model "
            f"--metrics {out}/train.json --plots {out}/plots && "
            f"{py}.supervised.evaluate --experiment dlpipe-supervised --data {data} "
            f"--model {out}/model --metrics {out}/evaluate.json --plots {out}/plots && "
            f"{py}.supervised.export {p} --registered-model dlpipe-classifier "
            f"--experiment dlpipe-supervised --data {data} --model {out}/model "
            f"--evaluation {out}/evaluate.json --output {out}/export --metrics {out}/export.json"
        ),
        "tune": (
            f"{py}.tuning.tune {p} --data {data} --output {out}/tune "
            f"--metrics {out}/tune.json --plots {out}/tune-plots"
        ),
        "pseudolabel": (
            f"{py}.semisupervised.prepare {p} --data {data} --output {out}/pl && "
            f"{py}.semisupervised.train {p} --data {out}/pl --output {out}/pl-model "
            f"--metrics {out}/pl.json --plots {out}/pl-plots"
        ),
    }
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "RAY_ADDRESS": own_ray,
        "DLPIPE_STORAGE": str(tmp_path / "ray_results"),
        **CREDENTIALS,
    }
    running = {
        name: subprocess.Popen(
            command,
            shell=True,
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for name, command in commands.items()
    }
    logs = {name: process.communicate(timeout=900)[0] for name, process in running.items()}
    for name, process in running.items():
        assert process.returncode == 0, f"{name} failed:\n{logs[name][-4000:]}"
    for name, log in logs.items():
        for sign in ("database is locked", "Retrying", "MLflow logging failed", PASSWORD):
            assert sign not in log, f"{name}: {sign!r} in its output:\n{log[-3000:]}"

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    client = mlflow.MlflowClient(uri)

    def runs(experiment: str) -> list:
        found = client.get_experiment_by_name(experiment)
        assert found is not None, f"experiment {experiment} never reached the server"
        return client.search_runs([found.experiment_id], max_results=100)

    supervised = runs("dlpipe-supervised")
    [train] = [r for r in supervised if r.data.tags.get("dvc_stage") == "train_supervised"]
    assert train.info.status == "FINISHED"
    assert len(client.get_metric_history(train.info.run_id, "val_loss")) == TRAIN_EPOCHS
    assert train.data.tags["precision"] == "fp32"
    assert {"evaluate", "export"} <= {r.data.tags.get("dvc_stage") for r in supervised}
    version = client.get_model_version_by_alias("dlpipe-classifier", "champion")
    assert version.version == "1" and version.status == "READY"
    # The artifacts went through the server into its artifact folder.
    assert any((server_root / "artifacts").rglob("*.onnx"))

    tune_runs = runs("dlpipe-tune")
    trials = [r for r in tune_runs if "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == TUNE_TRIALS
    assert all("val_accuracy" in r.data.metrics for r in trials)
    assert all(r.info.status == "FINISHED" for r in tune_runs)

    pseudo = runs("dlpipe-pseudolabel")
    assert pseudo and all(r.info.status == "FINISHED" for r in pseudo)
    assert any("test_accuracy" in r.data.metrics or r.data.metrics for r in pseudo)

    for run in supervised + tune_runs + pseudo:  # no credential made it into the record
        recorded = [*run.data.params.values(), *run.data.tags.values()]
        assert not any(PASSWORD in str(value) for value in recorded), run.info.run_id
