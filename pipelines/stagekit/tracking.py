"""Every MLflow call of the pipeline, in one place.

The tracking server comes from `MLFLOW_TRACKING_URI`; without it, runs go to SQLite under
`mlruns/` in the repository (no server to start). Nothing connects at import time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pipelines.stagekit.dataset import sha256_file
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.lineage import (
    GRAPH_HASH_TAG,
    dvc_stage_name,
    model_lineage,
    parse_model_ref,
    stage_record,
)
from pipelines.stagekit.spool import Spool, spool_dir

log = logging.getLogger(__name__)


def local_store() -> Path:
    """The repository's own store, `mlruns/`. In the repository DVC runs the stage for:
    `dvc exp run --temp` and queued experiments run in a copy elsewhere, and their runs
    belong in the user's store, not one deleted with the copy (DVC_ROOT names the repository
    in every mode)."""
    return Path(os.environ.get("DVC_ROOT", ".")) / "mlruns"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, or the repository's SQLite store as an absolute URI.

    Absolute, because Ray Train workers run in other directories (and rank 0 logs too).
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    local_store().mkdir(exist_ok=True)
    return f"sqlite:///{(local_store() / 'mlflow.db').resolve()}"


DASHBOARD_HOST, DASHBOARD_PORT = "127.0.0.1", 5000
"""Where `dlpipe ui` serves the MLflow dashboard over the local store."""


def dashboard_url() -> str:
    """The MLflow dashboard's address: the tracking server itself when there is one (it
    serves the UI), else what `dlpipe ui` starts over the local store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("http://", "https://")):
        return redacted_uri(uri)
    return f"http://{DASHBOARD_HOST}:{DASHBOARD_PORT}"


@contextlib.contextmanager
def _store_creation_lock(uri: str) -> Iterator[None]:
    """Held while a client opens a SQLite store. MLflow creates a new store's tables in
    whichever client opens it first, without a lock: two processes opening a new store at
    once (a stage and `dlpipe ui` on a fresh clone, a Ray Train worker and its driver) both
    create them, and one fails with "table ... already exists". Not held for other stores:
    a tracking server creates its database itself (processes sharing a PostgreSQL database
    directly, without a server, would meet the same race)."""
    if not uri.startswith("sqlite:"):
        yield
        return
    from sqlalchemy.engine import make_url

    database = make_url(uri).database  # without a query string such as ?timeout=
    lock = None
    if database and database != ":memory:":
        path = Path(database)
        try:
            lock = open(path.with_name(path.name + ".lock"), "a")
        except OSError:  # a missing folder (MLflow names it), a store only read here
            pass
    if lock is None:
        yield
        return
    import fcntl

    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    _bounded_retries()
    uri = uri or tracking_uri()
    with _store_creation_lock(uri):
        return MlflowClient(tracking_uri=uri)


def create_store(uri: str) -> None:
    """Create the store's tables now if it is new, as every later client expects them."""
    _client(uri)


def ensure_experiment(name: str, uri: str | None = None) -> str:
    """The experiment's id, creating it (with a local artifact store for SQLite) if needed."""
    client = _client(uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if (uri or tracking_uri()).startswith("sqlite:"):
        artifact_location = (local_store() / "artifacts").resolve().as_uri()
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


RUN_ID_KEY = "mlflow_run_id"
"""Key of a stage's metrics file naming the MLflow run of that execution, so that `dvc exp
show` has the run as a column and the pipeline report links each figure to it. Model cards
leave it out (`without_run_id`): they must be the same bytes on every re-run."""


def without_run_id(figures: Mapping[str, Any]) -> dict[str, Any]:
    """A stage's figures as a model card carries them: without the run id."""
    return {k: v for k, v in figures.items() if k != RUN_ID_KEY}


OUTPUT_TAG = "output_sha256"
"""Tag on a training run: the sha256 of the model file it wrote. Later stages find the run
from the file itself, so no run id is written into a model file, card or graph (the same
training run twice must give the same bytes; only metrics files name their run)."""


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
    """Tags linking a run to its code, pipeline stage and data (and, when DVC runs the
    stage, each dependency's sha256 and params value: pipelines/stagekit/lineage.py).
    `dvc_stage` is the dvc.yaml stage running, which `stage` (the module's) names when the
    function is called directly."""
    return {
        "git_commit": git_commit(),
        "dvc_stage": dvc_stage_name(stage),
        "data_sha256": data_hash,
        **stage_record(),
    }


def registry_lineage(reference: str, version: str | None = None) -> dict[str, Any]:
    """The chain behind a registered model (`models:/NAME@ALIAS`, `models:/NAME/3`, or NAME
    with `version`) in the configured store: pipelines/stagekit/lineage.py. A UserError names
    what is missing: the store, the model, the alias or the version, or a server that does
    not answer."""
    name, alias, number = parse_model_ref(reference, version)
    uri = tracking_uri() if os.environ.get("MLFLOW_TRACKING_URI") else None
    if uri is None and not (local_store() / "mlflow.db").is_file():
        raise UserError(
            f"no MLflow store at {local_store() / 'mlflow.db'} (run the pipeline first, or set "
            "MLFLOW_TRACKING_URI to the team's server)"
        )
    uri = uri or tracking_uri()
    from mlflow.exceptions import MlflowException

    try:
        with _quiet_retries():
            return model_lineage(_client(uri), name, alias, number)
    except UserError:
        raise
    except Exception as exc:
        first_line = redacted(str(exc).splitlines()[0] if str(exc) else repr(exc))[:200]
        if _unreachable(exc):
            raise UserError(
                f"the MLflow tracking server {redacted_uri(uri)} does not answer ({first_line})"
            ) from exc
        if isinstance(exc, MlflowException):  # refused: credentials, permissions, a bad name
            raise UserError(f"{redacted_uri(uri)} refused: {first_line}") from exc
        raise


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer and this logger keeps no spool (a Train worker's)."""


OFFLINE_S = 30.0
"""After a call finds the server unreachable, for this long a logger's writes go straight to
its spool: every try costs the HTTP client's retries, seconds a training epoch would wait."""

_offline_until: dict[str, float] = {}  # tracking URI -> time.monotonic() to try again

OFFLINE_MAX_S = 300.0
"""The skip window doubles with each failed try, up to this: a server that stays away
costs a training loop one try per five minutes."""
_failed_tries: dict[str, int] = {}  # tracking URI -> tries failed in a row

RETRY_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
"""MLflow's own defaults retry an unreachable server for about four minutes per call (and
a hung one for 8 x 120 s); with these a call gives up at once on a refused connection and
after about 20 s on a server that does not answer, and its record waits in the spool. Set
in the environment to override (e.g. a longer timeout for large artifacts on a slow
link)."""


class RunLogger:
    """Writes to one existing run by id; safe to hand to a Ray worker (holds only strings).

    With a `spool` directory (the stage driver's loggers), a write the server cannot take
    (down, unreachable, answering 5xx) is kept there in order and sent later: by the next
    write that finds the server back, at the end of the stage, by the next stage, or by
    `dlpipe tracking sync`. Without one (a Train worker, possibly on another node) such a
    write raises TrackingUnavailable; the driver logs the epochs from the checkpoint's
    history at the end (`log_history`), so nothing depends on the worker's writes.
    """

    def __init__(self, run_id: str, uri: str, spool: str | None = None) -> None:
        self.run_id = run_id
        self.uri = uri
        self.spool = spool

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._write(
            {
                "op": "metrics",
                "metrics": {_metric_key(k): float(v) for k, v in metrics.items()},
                "step": step or 0,
                "timestamp": int(time.time() * 1000),
            }
        )

    def log_history(self, rows: list[Mapping[str, float]]) -> None:
        """One row of figures per epoch (its `epoch` the step), as a training state's history
        holds them; only what the run lacks (per figure and epoch) is sent, so this can be
        repeated safely."""
        self._write(
            {
                "op": "history",
                "rows": [
                    {_metric_key(k): float(v) for k, v in row.items() if _is_number(v)}
                    for row in rows
                ],
                "timestamp": int(time.time() * 1000),
            }
        )

    def logged_steps(self, key: str) -> set[int]:
        return {m.step for m in _client(self.uri).get_metric_history(self.run_id, key)}

    def log_params(self, params: Mapping[str, Any]) -> None:
        flat = _flatten(params)
        self._write({"op": "params", "params": {k: str(v)[:6000] for k, v in flat.items()}})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._write({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._write({"op": "artifact", "artifact_path": artifact_path}, attach=path)

    def end(self, status: str) -> None:
        """status: FINISHED, FAILED or KILLED."""
        self._write({"op": "end", "status": status, "end_time": int(time.time() * 1000)})

    def flush(self) -> int:
        """Send this run's kept records, oldest first; returns how many still wait."""
        if self.spool is None:
            return 0
        return _replay(Spool(self.spool), self.run_id, self.uri)[2]

    def _write(self, record: dict[str, Any], attach: str | Path | None = None) -> None:
        record = {**record, "uri": self.uri}
        spool = Spool(self.spool) if self.spool is not None else None
        # Kept records go first, or the server would see this one out of order.
        waiting = spool is not None and spool.has(self.run_id) and self.flush() > 0
        if not waiting and time.monotonic() >= _offline_until.get(self.uri, 0.0):
            try:
                with _quiet_retries():
                    _send(_client(self.uri), self.run_id, {**record, "file": str(attach or "")})
                _failed_tries.pop(self.uri, None)
                return
            except Exception as exc:  # only an unreachable server is kept for later
                if not _unreachable(exc):
                    raise
                _went_offline(self.uri, exc, self.spool)
        if spool is None:
            raise TrackingUnavailable(f"MLflow at {redacted_uri(self.uri)} is unreachable")
        spool.append(self.run_id, record, attach)


def _send(client: Any, run_id: str, record: dict[str, Any]) -> None:
    """Apply one record (as RunLogger writes them) to the run."""
    from mlflow.entities import Metric, Param

    op = record["op"]
    if op == "metrics":
        stamp, step = record["timestamp"], record["step"]
        batch = [Metric(k, v, stamp, step) for k, v in record["metrics"].items()]
        client.log_batch(run_id, metrics=batch)
    elif op == "history":
        keys = sorted({k for row in record["rows"] for k in row})
        have = {k: {m.step for m in client.get_metric_history(run_id, k)} for k in keys}
        batch = [
            Metric(k, v, record["timestamp"], int(row["epoch"]))
            for row in record["rows"]
            for k, v in row.items()
            if int(row["epoch"]) not in have[k]
        ]
        for start in range(0, len(batch), 1000):  # MLflow caps a batch at 1000 metrics
            client.log_batch(run_id, metrics=batch[start : start + 1000])
    elif op == "params":
        items = [Param(k, v) for k, v in record["params"].items()]
        for start in range(0, len(items), 100):  # and at 100 params
            client.log_batch(run_id, params=items[start : start + 100])
    elif op == "tags":
        for key, value in record["tags"].items():
            client.set_tag(run_id, key, value)
    elif op == "artifact":
        client.log_artifact(run_id, record["file"], record["artifact_path"])
    elif op == "end":
        client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])
    else:
        raise ValueError(f"unknown tracking record {op!r}")


def _replay(spool: Spool, run_id: str, uri: str) -> tuple[int, int, int]:
    """Send run `run_id`'s kept records to `uri`: (sent, refused, still waiting). A record
    the server refuses is set aside with a warning; at the first sign of an outage the
    rest stay, in order. Under the spool's lock: `dlpipe tracking sync` and a stage may
    both replay, and a record appended meanwhile must not be lost or sent twice."""
    with spool.lock():
        records = spool.records(run_id)
        if not records or time.monotonic() < _offline_until.get(uri, 0.0):
            return 0, 0, len(records)
        client = _client(uri)
        refused = 0
        for done, record in enumerate(records):
            try:
                with _quiet_retries():
                    _send(client, run_id, record)
            except Exception as exc:
                if _unreachable(exc):
                    _went_offline(uri, exc, str(spool.directory))
                    spool.keep_only(run_id, records[done:])
                    return done - refused, refused, len(records) - done
                refused += 1
                where = spool.set_aside(run_id, record, redacted(str(exc)))
                log.warning(
                    "MLflow refused a kept %s record of run %s (%s): set aside in %s",
                    record["op"],
                    run_id,
                    redacted(str(exc).splitlines()[0])[:300],
                    where,
                )
        spool.keep_only(run_id, [])
    _failed_tries.pop(uri, None)
    log.info(
        "MLflow at %s answers again: %d kept record(s) of run %s sent",
        redacted_uri(uri),
        len(records) - refused,
        run_id,
    )
    return len(records) - refused, refused, 0


def sync_spool(uri: str | None = None, spool: str | None = None) -> dict[str, tuple[int, int, int]]:
    """Send every kept record meant for `uri` (default: the configured store); returns
    (sent, refused, still waiting) per run. Records kept for another server stay."""
    uri = uri or tracking_uri()
    kept = Spool(spool or spool_dir())
    counts = {}
    for run_id in kept.runs():
        records = kept.records(run_id)
        if records and records[0].get("uri") != uri:
            log.warning(
                "run %s: %d record(s) kept for MLflow at %s, not %s: set MLFLOW_TRACKING_URI "
                "to that server to send them",
                run_id,
                len(records),
                redacted_uri(records[0].get("uri", "?")),
                redacted_uri(uri),
            )
            counts[run_id] = (0, 0, len(records))
            continue
        counts[run_id] = _replay(kept, run_id, uri)
    return counts


@contextlib.contextmanager
def _quiet_retries() -> Iterator[None]:
    """Without urllib3's warning per retry: an outage is reported once, by this module."""
    pool_log = logging.getLogger("urllib3.connectionpool")
    level = pool_log.level
    pool_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pool_log.setLevel(level)


def _unreachable(exc: BaseException) -> bool:
    """A server that is down, unreachable, hung or failing (5xx), as opposed to one refusing
    the request itself (4xx: never retried) or a local error (a missing file: raised)."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return exc.get_http_status_code() >= 500
    if isinstance(exc, requests.HTTPError):  # artifact uploads raise it for any status
        return exc.response is not None and exc.response.status_code >= 500
    from requests.exceptions import RetryError

    return isinstance(exc, (requests.ConnectionError, requests.Timeout, RetryError))


def _went_offline(uri: str, exc: BaseException, spool: str | None) -> None:
    first = uri not in _offline_until
    tries = _failed_tries.get(uri, 0)
    _failed_tries[uri] = tries + 1
    _offline_until[uri] = time.monotonic() + min(OFFLINE_S * 2**tries, OFFLINE_MAX_S)
    if first and spool is not None:
        log.info(
            "MLflow at %s does not answer (%s): its records are kept in %s and sent once it "
            "answers",
            redacted_uri(uri),
            redacted(str(exc).splitlines()[0])[:200],
            spool,
        )


def redacted_uri(uri: str) -> str:
    """`uri` without its user and password, for messages."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


_CREDENTIALS = re.compile(r"(\w+://)[^/\s]*@")


def redacted(text: str) -> str:
    """`text` (an error message: MLflow's name the full URL) with every URL's user and
    password replaced."""
    return _CREDENTIALS.sub(r"\1***@", text)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@contextlib.contextmanager
def stage_run(
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
) -> Iterator[RunLogger]:
    """Open a run for one stage execution (or reopen `resume_run_id`, the run of an
    interrupted execution); it ends FINISHED, or FAILED if the block raises.

    What an earlier stage kept while the server was down is sent first. The server must
    answer here, when the run is made; afterwards an outage only delays the writes (see
    RunLogger), and one warning at the end says what is still waiting and where."""
    uri = tracking_uri()
    sync_spool(uri)
    try:
        run_id = _open_run(uri, experiment, run_name, tags, parent_run_id, resume_run_id)
    except Exception as exc:
        if not _unreachable(exc):
            raise
        raise UserError(
            f"the MLflow tracking server {redacted_uri(uri)} does not answer "
            f"({redacted(str(exc).splitlines()[0])[:200]}): start it, or unset MLFLOW_TRACKING_URI to "
            "track into mlruns/"
        ) from exc
    logger = RunLogger(run_id, uri, spool_dir())
    try:
        yield logger
    except BaseException:
        logger.end("FAILED")
        raise
    logger.end("FINISHED")
    waiting = logger.flush()
    if waiting:
        log.warning(
            "the MLflow server %s did not answer: %d record(s) of run %s (figures, params, "
            "artifacts, its end) are kept in %s; the next stage sends them once it answers, "
            "or run `dlpipe tracking sync`. The stage's outputs are saved.",
            redacted_uri(uri),
            waiting,
            run_id,
            logger.spool,
        )


def _open_run(
    uri: str,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    parent_run_id: str | None,
    resume_run_id: str | None,
) -> str:
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    if resume_run_id:
        try:
            client.update_run(resume_run_id, status="RUNNING")
            return resume_run_id
        except MlflowException as exc:
            if _unreachable(exc):
                raise
            # deleted, or recorded against another tracking store
            log.warning(
                "MLflow run %s of the interrupted execution is gone: a new run", resume_run_id
            )
    all_tags = dict(tags)
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    experiment_id = ensure_experiment(experiment, uri)
    return client.create_run(experiment_id, run_name=run_name, tags=all_tags).info.run_id


def _bounded_retries() -> None:
    for name, value in RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)


def start_child_run(
    parent: RunLogger, experiment: str, name: str, tags: Mapping[str, str]
) -> RunLogger:
    """A run nested under `parent` in the MLflow UI; end it with its `end`."""
    client = _client(parent.uri)
    run = client.create_run(
        ensure_experiment(experiment, parent.uri),
        run_name=name,
        tags={**tags, "mlflow.parentRunId": parent.run_id},
    )
    return RunLogger(run.info.run_id, parent.uri, parent.spool)


def run_logger(run_id: str) -> RunLogger:
    """A driver's logger for an existing run of the configured store (e.g. the training run
    a later stage adds its figures to), keeping its writes through an outage."""
    return RunLogger(run_id, tracking_uri(), spool_dir())


def child_runs(parent: RunLogger, experiment: str, tag: str) -> dict[str, RunLogger]:
    """The runs under `parent`, keyed by their value of `tag` (e.g. a Tune trial id)."""
    client = _client(parent.uri)
    runs = client.search_runs(
        [ensure_experiment(experiment, parent.uri)],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'",
        max_results=10000,
    )
    return {
        r.data.tags[tag]: RunLogger(r.info.run_id, parent.uri, parent.spool)
        for r in runs
        if tag in r.data.tags
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
            # The graph runs on onnxruntime alone. Without a list, MLflow infers one by
            # loading the model in a subprocess (log_model 3.8-8.9 s here, ~3 s of the
            # export stage's wall time) and finds the same packages.
            pip_requirements=mlflow.onnx.get_default_pip_requirements(),
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
) -> tuple[str, str]:
    """An export stage's MLflow record: a run for this execution (nested under the training
    run that wrote `model_file`, found by its hash), the ONNX graph registered as a new
    version of `registered_model` with `alias` moved to it, and the parity `figures` on
    both runs. The version's source run is the training run when the store has it (so the
    registry links back to the curves), else this execution's run. Returns the version and
    this execution's run id."""
    train_run_id = producing_run(model_file, experiment)
    tags = stage_tags(stage, data_hash)
    with stage_run(experiment, stage, tags, parent_run_id=train_run_id) as run:
        version = register_onnx_model(
            train_run_id or run.run_id, onnx_path, card_path, registered_model, alias, extra_files
        )
        run.log_metrics(figures)
        run.set_tags({"registered_model": registered_model, "model_version": version})
    if train_run_id is not None:
        run_logger(train_run_id).log_metrics(figures)
    log.info("registered %s version %s as @%s", registered_model, version, alias)
    return version, run.run_id


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
