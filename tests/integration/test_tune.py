"""The `tune` stage on the session's Ray cluster: real trials through the training driver,
ASHA, a diverging trial, MLflow parent/child runs, best_params.yaml consumed by training,
and an interrupted search resumed without re-running its finished trials."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import yaml
from mlflow.tracking import MlflowClient

from models.architecture import ArchitectureConfig
from pipelines.stagekit.config import TrainConfig, load_params, overlay_sections
from pipelines.stagekit.tracking import RUN_ID_KEY
from pipelines.supervised.train import train_supervised
from pipelines.tuning.config import TuneConfig
from tests.helpers import REPO, run_command
from tests.integration.conftest import quick_train_config

pytestmark = pytest.mark.integration

SMALL_SEARCH = TuneConfig(
    optimizers=("minibatch_sgd", "adam", "rmsprop"),
    # minibatch_sgd at lr >= 20 on this MLP diverges within an epoch: the search must go on.
    lr={"default": (0.001, 0.01), "minibatch_sgd": (20.0, 50.0)},
    space={"train.batch_size": (32, 64)},
    samples=1,
    epochs=3,
    grace_period=1,
    max_concurrent_trials=2,
)


def child_runs(uri: str, experiment: str) -> list:
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return [r for r in runs if "mlflow.parentRunId" in r.data.tags]


@pytest.fixture(scope="module")
def searched(trained, tmp_path_factory):
    from pipelines.tuning.tune import tune_search

    root = tmp_path_factory.mktemp("tune")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        env.setenv("DLPIPE_STORAGE", str(root / "ray_results"))
        summary = tune_search(
            ArchitectureConfig(),
            quick_train_config(),
            SMALL_SEARCH,
            str(trained.prepared),
            str(root / "out"),
            str(root / "tune.json"),
            str(root / "plots"),
        )
    return root, uri, summary


def test_search_covers_every_optimizer_and_survives_a_diverging_trial(searched):
    root, uri, summary = searched
    written = json.loads((root / "tune.json").read_text())
    search_run = written.pop(RUN_ID_KEY)  # the search's parent run, named in its file
    assert summary == written
    assert MlflowClient(uri).get_run(search_run).info.run_name == "tune"
    assert summary["trials"] == 3
    assert summary["optimizers"] == ["minibatch_sgd", "adam", "rmsprop"]
    assert summary["trials_diverged"] == 1
    assert summary["best_optimizer"] in ("adam", "rmsprop")
    assert summary["best_val_accuracy"] > 0.8
    assert 0.001 <= summary["best_lr"] <= 0.01
    with (root / "out" / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["optimizer"] for r in rows} == {"minibatch_sgd", "adam", "rmsprop"}
    assert sorted(int(r["trial"]) for r in rows) == [0, 1, 2]
    diverged = [r for r in rows if r["status"] == "diverged"]
    assert [r["optimizer"] for r in diverged] == ["minibatch_sgd"]
    assert {r["train.batch_size"] for r in rows} <= {"32", "64"}
    for image in ("lr_sweep.png", "best_curves.png"):
        assert (root / "plots" / image).stat().st_size > 1000
    # The search is over: no Tune or Train state is left to resume.
    assert not any((root / "ray_results").iterdir())


def test_mlflow_has_a_parent_run_and_one_child_per_trial(searched):
    _, uri, summary = searched
    children = child_runs(uri, SMALL_SEARCH.experiment)
    assert len(children) == 3
    assert len({r.data.tags["mlflow.parentRunId"] for r in children}) == 1
    statuses = sorted(r.data.tags["status"] for r in children)
    assert statuses.count("diverged") == 1
    best = [r for r in children if r.data.tags.get("best_trial") == "true"]
    # The stage's files number the trials (the same search, the same bytes); MLflow has
    # both the number and Tune's id, whose prefix is random per search.
    assert len(best) == 1 and best[0].data.tags["tune_trial"] == str(summary["best_trial"])
    assert best[0].data.tags["tune_trial_id"].endswith(f"_{summary['best_trial']:05d}")
    client = MlflowClient(uri)
    curve = client.get_metric_history(best[0].info.run_id, "val_accuracy")
    assert len(curve) >= 1 and max(m.value for m in curve) == pytest.approx(
        summary["best_val_accuracy"]
    )
    assert best[0].data.params["train.optimizer"] == summary["best_optimizer"]


def test_training_opts_into_the_best_params(searched, tmp_path):
    root, _, summary = searched
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"tuned_params": str(root / "out" / "best_params.yaml")}))
    arguments = load_params(train_supervised, params)
    tuned = overlay_sections(
        arguments["tuned_params"], {"model": arguments["model"], "train": arguments["train"]}
    )
    assert tuned["train"].optimizer == summary["best_optimizer"]
    assert tuned["train"].lr == pytest.approx(summary["best_lr"])
    assert tuned["train"].batch_size in (32, 64)
    # The default overlay changes nothing.
    sections = {"model": ArchitectureConfig(), "train": TrainConfig()}
    assert overlay_sections(REPO / "pipelines/tuning/untuned.yaml", sections) == sections


def run_search(search: TuneConfig, trained, tmp_path) -> dict:
    """`search` over the quick training settings, its outputs under tmp_path."""
    from pipelines.tuning.tune import tune_search

    return tune_search(
        ArchitectureConfig(),
        quick_train_config(),
        search,
        str(trained.prepared),
        str(tmp_path / "out"),
        str(tmp_path / "tune.json"),
        str(tmp_path / "plots"),
    )


def test_optuna_tpe_searches_the_same_space_with_a_trial_of_two_workers(trained, stores, tmp_path):
    """A trial of two workers is a Ray Train run (DDP), its reports forwarded to Tune from
    the trial's thread; every other search here trains one worker in the trial's actor."""
    stores()
    search = replace(
        SMALL_SEARCH,
        optimizers=("adam",),
        search="optuna",
        scheduler="none",
        # One trial: the searcher's and the Train run's wiring are under test, not TPE's
        # choices (a trial of two workers waits ~25 s here for its Train run to start).
        samples=1,
        epochs=1,
        workers_per_trial=2,
        max_concurrent_trials=1,  # 2 CPUs here
    )
    summary = run_search(search, trained, tmp_path)
    assert summary["trials"] == 1 and summary["search"] == "optuna"
    assert summary["trials_failed"] == 0 and summary["best_optimizer"] == "adam"
    assert summary["best_val_accuracy"] > 0.5


def test_pbt_restarts_trailing_trials_from_leading_ones(trained, stores, tmp_path):
    """Population based training: Tune holds every trial's checkpoints (reported from the
    trials' own actors), so a trailing trial goes on from a leading one's weights."""
    stores()
    search = replace(
        SMALL_SEARCH,
        optimizers=("adam", "rmsprop"),
        # Far apart on purpose: one trial of each pair trails and exploits the other.
        lr={"default": (0.00003, 0.01)},
        scheduler="pbt",
        # Synchronous PBT compares both trials at epoch 4 whatever their speeds, so the
        # trailing one takes the leading one's weights there. (Asynchronous, a CI run whose
        # second trial started seconds late saw no exploit: each trial met its perturbation
        # points while the other had no score yet or had finished.)
        synchronous=True,
        perturbation_interval=4,
        epochs=6,  # one perturbation point: each is a pause and restart of every trial
    )
    summary = run_search(search, trained, tmp_path)
    assert summary["trials"] == 2 and summary["scheduler"] == "pbt"
    assert summary["pbt_exploits"] == 1  # the trailing trial, once, at epoch 4
    assert summary["trials_stopped_early"] == 0 and summary["trials_failed"] == 0
    assert summary["best_val_accuracy"] > 0.8


def _paced_trial(config: dict) -> None:
    """A PBT trial of `epochs` reports of its role's score, each with a checkpoint (a pause
    saves it, the restart reads it). A staying role marks epoch 4 in `marks`; the leaving
    role, after `leave_at` epochs, waits for both marks and 2 s more (the others paused by
    then), and ends itself (`leave: "end"`, as a diverging trial does) or fails (`"fail"`)."""
    import tempfile
    from pathlib import Path

    from ray import tune as ray_tune

    role, marks = config["role"], Path(config["marks"])
    start = ray_tune.get_checkpoint()
    epoch = 0
    if start is not None:
        with start.as_directory() as folder:
            epoch = int((Path(folder) / "epoch").read_text())
    while epoch < role["epochs"]:
        if epoch == role.get("leave_at"):
            deadline = time.monotonic() + 60
            while len(list(marks.glob("*"))) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(2.0)
            if role["leave"] == "fail":
                raise RuntimeError("this trial fails on purpose")
            return
        epoch += 1
        if epoch == 4:
            (marks / str(role["score"])).touch()
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "epoch").write_text(str(epoch))
            checkpoint = ray_tune.Checkpoint.from_directory(folder)
            ray_tune.report({"score": role["score"], "epoch": epoch}, checkpoint=checkpoint)


def test_synchronous_pbt_goes_on_when_trials_leave_while_the_others_wait(ray_cluster, tmp_path):
    """Ray's synchronous PBT waited for ever when a trial ended itself or failed after the
    others had paused at a perturbation point (pipelines/tuning/pbt.py). Here two trials
    reach epoch 4 and wait while two others, at epoch 3, leave: one ends itself, one
    fails. The two must be perturbed there (the trailing one takes the leading one's role)
    and go on to their last epoch. Tune's time budget ends a stalled search, failing the
    test."""
    from ray import tune as ray_tune

    from pipelines.tuning.pbt import SynchronousPbt

    class StayersWhenLeaving(ray_tune.Callback):
        """The staying trials' statuses as each leaving trial ends or fails."""

        def __init__(self) -> None:
            self.seen: dict[str, list[str]] = {}

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._leaving(trials, trial)

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._leaving(trials, trial)

        def _leaving(self, trials, trial) -> None:
            if "leave" in trial.config["role"]:
                stayers = [t for t in trials if "leave" not in t.config["role"]]
                self.seen[trial.config["role"]["leave"]] = [t.status for t in stayers]

    (tmp_path / "marks").mkdir()
    roles = [
        {"score": 1.0, "epochs": 8},
        {"score": 2.0, "epochs": 8},
        {"score": 0.5, "epochs": 8, "leave_at": 3, "leave": "end"},
        {"score": 0.4, "epochs": 8, "leave_at": 3, "leave": "fail"},
    ]
    stayers = StayersWhenLeaving()
    tuner = ray_tune.Tuner(
        ray_tune.with_resources(_paced_trial, {"cpu": 0.5}),
        param_space={
            "role": ray_tune.grid_search(roles),
            "marks": str(tmp_path / "marks"),
            "lr": 0.5,
        },
        tune_config=ray_tune.TuneConfig(
            metric="score",
            mode="max",
            scheduler=SynchronousPbt(
                time_attr="training_iteration",
                perturbation_interval=4,
                hyperparam_mutations={"lr": ray_tune.uniform(0.1, 1.0)},
            ),
            time_budget_s=90,
        ),
        run_config=ray_tune.RunConfig(storage_path=str(tmp_path), callbacks=[stayers], verbose=0),
    )
    results = list(tuner.fit())
    # The stall's situation with Ray's own PBT: both waiting as each leaver leaves.
    assert stayers.seen == {"end": ["PAUSED", "PAUSED"], "fail": ["PAUSED", "PAUSED"]}
    stayed = [r for r in results if "leave" not in r.config["role"]]
    left = {r.config["role"]["leave"]: r for r in results if "leave" in r.config["role"]}
    assert [r.metrics["epoch"] for r in stayed] == [8, 8]  # both went on past the point
    assert [r.config["role"]["score"] for r in stayed] == [2.0, 2.0]  # perturbed at 4
    assert left["end"].metrics["epoch"] == left["fail"].metrics["epoch"] == 3
    assert left["end"].error is None and left["fail"].error is not None


def test_a_bad_search_space_is_refused_before_any_trial(trained, stores):
    from pipelines.stagekit.errors import UserError
    from pipelines.tuning.tune import tune_search

    stores()
    search = replace(SMALL_SEARCH, space={"train.batch_size": (0,)})
    with pytest.raises(UserError, match=r"tune.space.train.batch_size: 0(\.0)? is not a valid"):
        tune_search(
            ArchitectureConfig(),
            TrainConfig(),
            search,
            str(trained.prepared),
            "out",
            "tune.json",
            "plots",
        )
    with pytest.raises(ValueError, match="space.train.colour"):
        TuneConfig(space={"train.colour": (1,)})


def test_an_interrupted_search_resumes_without_rerunning_finished_trials(
    trained, ray_cluster, tmp_path
):
    """Ctrl-C in the middle of a search, then the same command again."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(epochs=2, batch_size=32)
    # Long enough for the third trial to be running when the signal comes: one actor runs
    # the trials one after the other, so the third starts as soon as the second ends, and
    # at 2 epochs (~0.4 s) it had finished before this test saw the second's end.
    epochs = 30
    params["tune"].update(
        # Three trials one at a time: interrupted once two have finished, the third is
        # left to the resumed search.
        optimizers=["adam", "rmsprop", "adagrad"],
        samples=1,
        epochs=epochs,
        scheduler="none",
        max_concurrent_trials=1,
        space={"train.batch_size": [32]},
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # The store is created here, before the search starts: MLflow creates a new SQLite
    # store's tables in whichever client opens it first, and this test's polling client and
    # the search's racing to do so failed CI once ("table ... already exists").
    MlflowClient(uri).search_experiments()
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_cluster,
        "MLFLOW_TRACKING_URI": uri,
        "DLPIPE_STORAGE": str(tmp_path / "ray_results"),
    }
    command = [
        sys.executable,
        "-m",
        "pipelines.tuning.tune",
        "--params",
        str(tmp_path / "params.yaml"),
        "--data",
        str(trained.prepared),
        "--output",
        str(tmp_path / "out"),
        "--metrics",
        str(tmp_path / "tune.json"),
        "--plots",
        str(tmp_path / "plots"),
    ]
    first = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 300
    finished: dict[str, int] = {}
    while time.monotonic() < deadline and len(finished) < 2:
        time.sleep(1)
        try:
            runs = child_runs(uri, "dlpipe-tune")
        except Exception:  # no experiment yet, or the store busy with a write
            continue
        finished = {
            r.data.tags["tune_trial_id"]: len(
                MlflowClient(uri).get_metric_history(r.info.run_id, "val_loss")
            )
            for r in runs
            if r.data.tags.get("status") == "completed"
        }
    first.send_signal(signal.SIGINT)
    output, _ = first.communicate(timeout=120)
    assert len(finished) >= 2, output
    assert first.returncode == 130, output
    assert "search interrupted" in output
    assert not (tmp_path / "tune.json").exists()

    second = run_command(command, REPO, env, timeout_s=600)
    assert second.returncode == 0, second.stdout + second.stderr
    log = second.stdout + second.stderr
    assert "resuming the interrupted search" in log
    for trial_id in finished:  # not started again
        assert f"trial {trial_id} started" not in log
    summary = json.loads((tmp_path / "tune.json").read_text())
    assert summary["trials"] == 3
    runs = child_runs(uri, "dlpipe-tune")
    assert len(runs) == 3  # one per trial: the resumed ones kept theirs
    client = MlflowClient(uri)
    for run in runs:
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == epochs
