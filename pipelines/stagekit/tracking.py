"""Every MLflow call of the pipeline, in one place.

The tracking server comes from `MLFLOW_TRACKING_URI`; without it, runs go to SQLite under
`mlruns/` in the repository (no server to start). Nothing connects at import time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipelines.stagekit.dataset import sha256_file

log = logging.getLogger(__name__)

LOCAL_STORE = Path("mlruns")
GRAPH_HASH_TAG = "sha256/"
"""Registry version tags `sha256/<graph file>`: each ONNX graph's hash, written at export
and checked by every replica before it serves the version (serving/model_checks.py)."""


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the repository's SQLite store as an absolute URI.

    Absolute, because Ray Train workers run in other directories (and rank 0 logs too).
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    LOCAL_STORE.mkdir(exist_ok=True)
    return f"sqlite:///{(LOCAL_STORE / 'mlflow.db').resolve()}"


def _client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri or tracking_uri())


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """The experiment's id, creating it (with a local artifact store for SQLite) if needed."""
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if (uri or tracking_uri()).startswith("sqlite:"):
        artifact_location = (LOCAL_STORE / "artifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def git_commit() -> str:
    """HEAD's commit, with '-dirty' when tracked files have uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


OUTPUT_TAG = "output_sha256"
"""Tag on a training run: the sha256 of the model file it wrote. Later stages find the run
from the file itself, so no run id is written into a file that DVC hashes (the same
training run twice must give the same bytes)."""


def tag_output(run: RunLogger, model_file: str | Path) -> None:
    """Mark `run` as the run that wrote `model_file`."""
    run.set_tags({OUTPUT_TAG: sha256_file(model_file)})


def producing_run(model_file: str | Path, experiment: str) -> str | None:
    """The id of the latest run in `experiment` that wrote exactly `model_file`, or None
    (the model was trained against another tracking store, e.g. pulled from a DVC remote)."""
    client = _client()
    found = client.get_experiment_by_name(experiment)
    runs = (
        client.search_runs(
            [found.experiment_id],
            filter_string=f"tags.{OUTPUT_TAG} = '{sha256_file(model_file)}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found is not None
        else []
    )
    if not runs:
        log.warning(
            "%s: no run of MLflow experiment %r wrote this model (trained against another "
            "tracking store?); this stage's figures go to its own run only",
            model_file,
            experiment,
        )
        return None
    return runs[0].info.run_id


def stage_tags(stage: str, data_hash: str) -> dict[str, str]:
    """Tags linking a run to its code, pipeline stage and data."""
    return {"git_commit": git_commit(), "dvc_stage": stage, "data_sha256": data_hash}


class RunLogger:
    """Logs to one existing run by id; safe to hand to a Ray worker (holds only strings)."""

    def __init__(self, run_id: str, uri: str) -> None:
        self.run_id = run_id
        self.uri = uri

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_metric_key(k), float(v), now, step or 0) for k, v in metrics.items()]
        _client(self.uri).log_batch(self.run_id, metrics=batch)

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in _client(self.uri).get_metric_history(self.run_id, key)}

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = _flatten(params)
        client = _client(self.uri)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            client.log_batch(self.run_id, params=items[start : start + 100])

    def set_tags(self, tags: Mapping[str, str]) -> None:
        client = _client(self.uri)
        for key, value in tags.items():
            client.set_tag(self.run_id, key, value)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        _client(self.uri).log_artifact(self.run_id, str(path), artifact_path)


@contextlib.contextmanager
def stage_run(
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> Iterator[RunLogger]:
    """Open a run for one stage execution (or reopen `resume_run_id`, the run of an
    interrupted execution); it ends FINISHED, or FAILED if the block raises."""
    uri = tracking_uri()
    client = _client(uri)
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run_id = None
    if resume_run_id:
        from mlflow.exceptions import MlflowException

        try:
            client.update_run(resume_run_id, status="RUNNING")
            run_id = resume_run_id
        except MlflowException:  # deleted, or recorded against another tracking store
            log.warning(
                "MLflow run %s of the interrupted execution is gone: a new run", resume_run_id
            )
    if run_id is None:
        experiment_id = ensure_experiment(experiment, uri)
        run_id = client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id
    logger = RunLogger(run_id, uri)
    try:
        yield logger
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")


def start_child_run(
    parent: RunLogger, experiment: str, name: str, tags: Mapping[str, str]
) -> RunLogger:
    """A run nested under `parent` in the MLflow UI; end it with `end_run`."""
    client = _client(parent.uri)
    run = client.create_run(
        ensure_experiment(experiment, parent.uri),
        run_name=name,
        tags={**tags, "mlflow.parentRunId": parent.run_id},
    )
    return RunLogger(run.info.run_id, parent.uri)


def end_run(run: RunLogger, status: str) -> None:
    """status: FINISHED, FAILED or KILLED."""
    _client(run.uri).set_terminated(run.run_id, status=status)


def child_runs(parent: RunLogger, experiment: str, tag: str) -> dict[str, RunLogger]:
    """The runs under `parent`, keyed by their value of `tag` (e.g. a Tune trial id)."""
    client = _client(parent.uri)
    runs = client.search_runs(
        [ensure_experiment(experiment, parent.uri)],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'",
        max_results=10000,
    )
    return {
        r.data.tags[tag]: RunLogger(r.info.run_id, parent.uri) for r in runs if tag in r.data.tags
    }


def register_onnx_model(
    run_id: str,
    onnx_path: Path,
    card_path: Path,
    name: str,
    alias: str,
    extra_files: tuple[Path, ...] = (),
) -> str:
    """Log the ONNX model (with its model card and any `extra_files`, e.g. a tokenizer) to the
    run, register it and move `alias` to it."""
    import mlflow
    import onnx

    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_id=run_id):
        info = mlflow.onnx.log_model(
            onnx.load(str(onnx_path)),
            name="onnx_model",
            extra_files=[str(card_path), *(str(p) for p in extra_files)],
            save_as_external_data=False,
        )
    version = mlflow.register_model(info.model_uri, name)
    client = _client()
    # Each graph's sha256, kept by the registry itself: a replica refuses files whose hash
    # differs (serving/model_checks.py), so rewriting the artifact store, card included,
    # cannot swap the model served. Tagged before the alias moves, so that the alias never
    # names a version without them.
    for graph in (onnx_path, *extra_files):
        if graph.suffix == ".onnx":
            client.set_model_version_tag(
                name, version.version, f"{GRAPH_HASH_TAG}{graph.name}", sha256_file(graph)
            )
    # What the exported files leave out so that a re-run gives the same bytes: which run
    # and which commit made this version (MLflow stamps the time itself).
    client.set_model_version_tag(name, version.version, "source_run", run_id)
    client.set_model_version_tag(name, version.version, "git_commit", git_commit())
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def register_export(
    stage: str,
    experiment: str,
    data_hash: str,
    model_file: Path,
    onnx_path: Path,
    card_path: Path,
    registered_model: str,
    alias: str,
    figures: Mapping[str, float],
    extra_files: tuple[Path, ...] = (),
) -> str:
    """An export stage's MLflow record: a run for this execution (nested under the training
    run that wrote `model_file`, found by its hash), the ONNX graph registered as a new
    version of `registered_model` with `alias` moved to it, and the parity `figures` on
    both runs. The version's source run is the training run when the store has it (so the
    registry links back to the curves), else this execution's run. Returns the version."""
    train_run_id = producing_run(model_file, experiment)
    tags = stage_tags(stage, data_hash)
    with stage_run(experiment, stage, tags, parent_run_id=train_run_id) as run:
        version = register_onnx_model(
            train_run_id or run.run_id, onnx_path, card_path, registered_model, alias, extra_files
        )
        run.log_metrics(figures)
        run.set_tags({"registered_model": registered_model, "model_version": version})
    if train_run_id is not None:
        RunLogger(train_run_id, tracking_uri()).log_metrics(figures)
    log.info("registered %s version %s as @%s", registered_model, version, alias)
    return version


def _metric_key(key: str) -> str:
    # MLflow metric and param keys allow only alphanumerics, _ - . space : /
    # (class names such as "Crohn's" end up in keys).
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in key)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[_metric_key(f"{prefix}{key}")] = value
    return flat
