"""Training and serving on a two-node Ray cluster that loses a node.

    python -m benchmarks.cluster        # writes benchmarks/results/cluster.json (~4 min)

What a cluster adds over one machine is failure: a node goes away mid-run. This starts a
real two-node cluster on this machine with Ray's own `ray.cluster_utils.Cluster` (a head
and a worker node, separate raylet processes, 1 CPU each) and measures, against an
undisturbed run with the same seed in the same session:

- training: `train_supervised` (the stage's own function) with 2 workers, one per node,
  checkpointing to storage both nodes see (`DLPIPE_STORAGE`, as an NFS mount would be).
  After two checkpoints the worker node is killed (no graceful shutdown) and a replacement
  node joins, as an autoscaler would add one; the run resumes from its last checkpoint.
  Recorded: whether it finished, test accuracy minus the undisturbed run's, epochs redone,
  and the seconds from the loss to the first epoch of the resumed run.
- serving: two replicas of the Serve app, one per node, under steady client load; the node
  of one is killed and a replacement joins. Recorded: requests sent and failed, the seconds
  clients saw failures, and the seconds until two replicas ran again.

tests/cluster/test_multinode.py runs the same scenario and asserts on its figures.
Node failures are detected by Ray's health checks: `HEALTH_CHECKS` shortens them from the
default 5 x 3 s (a setting of the cluster, recorded in the results).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.faults.serving import classifier_app, free_port, replicas_running
from benchmarks.loadgen import ThreadedLoad

RESULTS = Path(__file__).parent / "results" / "cluster.json"
HEALTH_CHECKS = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
EPOCHS = 24  # long enough (~0.5 s each) to lose a node mid-run, short enough for CI
CHECKPOINTS_BEFORE_LOSS = 2
SERVE_LOAD_CLIENTS = 4


@dataclass
class TrainingOutcome:
    test_accuracy: float
    worker_nodes: list[str]
    """Ray node id of each rank (of the last attempt), from the run's MLflow tags."""
    epochs_run: int
    finished: bool = True
    epochs_lost: int = 0
    """Finished epochs the resumed run had to train again."""
    recovery_s: float | None = None
    """From the node loss to the first epoch the resumed run reported."""
    resumed_from_epoch: int | None = None


@dataclass
class ServeOutcome:
    replica_nodes: list[str]
    replicas_answering: int
    """Distinct replicas that answered /v1/models before the loss (they share one port)."""
    requests: int = 0
    failed: int = 0
    failure_window_s: float = 0.0
    """From the node loss to the last failed request (0: none failed)."""
    replicas_back_s: float | None = None
    """From the node loss until two replicas ran again."""
    failures: list[str] = field(default_factory=list)


class TwoNodeCluster:
    """A head node (this process's driver attaches to it) and one worker node, 1 CPU each."""

    def __init__(self) -> None:
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "include_dashboard": True,
                "_system_config": dict(HEALTH_CHECKS),  # Ray adds its own keys to it
            },
        )
        self.worker = self.cluster.add_node(num_cpus=1)
        self.cluster.wait_for_nodes()

    def connect(self) -> str:
        """Join as the driver; returns the dashboard URL (Serve's REST API)."""
        import ray

        context = ray.init(address=self.cluster.address, logging_level="WARNING")
        return f"http://{context.dashboard_url}"

    @property
    def head_id(self) -> str:
        return self.cluster.head_node.node_id

    def replace_worker(self) -> str:
        """Kill the worker node's processes at once (a crash, not a drain) and add a fresh
        node; returns the lost node's id."""
        lost = self.worker.node_id
        self.cluster.remove_node(self.worker, allow_graceful=False)
        self.worker = self.cluster.add_node(num_cpus=1)
        return lost

    def shutdown(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


def prepare_digits(root: Path) -> Path:
    """The bundled digits, ingested and prepared exactly as the pipeline's first stages."""
    from pipelines.supervised.config import PrepareConfig
    from pipelines.supervised.ingest_digits import ingest_digits
    from pipelines.supervised.prepare import prepare

    ingest_digits(str(root / "raw"))
    prepare(PrepareConfig(), str(root / "raw"), str(root / "prepared"))
    return root / "prepared"


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train_and_evaluate(
    root: Path, prepared: Path, tag: str, nodes: TwoNodeCluster | None = None
) -> TrainingOutcome:
    """`train_supervised` + `evaluate` on 2 workers; with `nodes`, the worker node is
    replaced after `CHECKPOINTS_BEFORE_LOSS` checkpoints."""
    from models.architecture import ArchitectureConfig
    from pipelines.stagekit.config import TrainConfig
    from pipelines.supervised.config import TrackingConfig
    from pipelines.supervised.evaluate import evaluate
    from pipelines.supervised.train import train_supervised

    out = root / tag
    storage = root / "shared-storage"  # every node's view of the checkpoints
    train = TrainConfig(epochs=EPOCHS, batch_size=32, num_workers=2, early_stopping_patience=0)
    tracking = TrackingConfig(experiment=f"cluster-{tag}")
    loss: dict[str, Any] = {}

    def train_stage() -> dict:
        return train_supervised(
            ArchitectureConfig(),
            train,
            tracking,
            data_dir=str(prepared),
            output=str(out / "model"),
            metrics_path=str(out / "train.json"),
            plots_dir=str(out / "plots"),
        )

    if nodes is None:
        summary = train_stage()
    else:
        # Ray starts a node only from the main thread (it installs signal handlers): the
        # stage trains on a thread while this one watches the checkpoints and kills the node.
        with ThreadPoolExecutor(1) as pool:
            training = pool.submit(train_stage)
            _lose_node_after_checkpoints(nodes, storage, loss, training)
            summary = training.result()
    metrics = evaluate(
        tracking.experiment,
        str(prepared),
        str(out / "model"),
        str(out / "evaluate.json"),
        str(out / "plots"),
    )
    run = _latest_run(tracking.experiment, "train_supervised")
    outcome = TrainingOutcome(
        test_accuracy=float(metrics["test_accuracy"]),
        worker_nodes=run.data.tags.get("worker_nodes", "").split(","),
        epochs_run=int(summary["epochs_run"]),
    )
    if nodes is not None:
        if "lost_at" not in loss:
            raise RuntimeError(f"the node was never lost during training: {loss}")
        _add_recovery(outcome, run.info.run_id, loss["lost_at"])
    return outcome


def _lose_node_after_checkpoints(
    nodes: TwoNodeCluster, storage: Path, loss: dict, training: Future
) -> None:
    seen: set[str] = set()
    deadline = time.monotonic() + 300
    while len(seen) < CHECKPOINTS_BEFORE_LOSS and time.monotonic() < deadline:
        if training.done():
            return
        seen.update(p.name for p in storage.rglob("checkpoint_*"))
        time.sleep(0.05)
    loss["checkpoints_seen"] = len(seen)
    loss["lost_at"] = time.time()
    loss["lost_node"] = nodes.replace_worker()
    print(f"node {loss['lost_node'][:8]} lost after {len(seen)} checkpoint(s)", flush=True)


def _latest_run(experiment: str, stage: str):
    import mlflow

    client = mlflow.MlflowClient()
    found = client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id],
        filter_string=f"tags.dvc_stage = '{stage}'",
        order_by=["attribute.start_time DESC"],
        max_results=1,
    )
    return found[0]


def _add_recovery(outcome: TrainingOutcome, run_id: str, lost_at: float) -> None:
    """Epochs redone and recovery time from the run's per-epoch MLflow history: every
    report carries `attempt_start_epoch`, the epoch its attempt resumed from."""
    import mlflow

    history = mlflow.MlflowClient().get_metric_history(run_id, "attempt_start_epoch")
    epochs = {
        (m.timestamp, m.step, m.value)
        for m in history  # (when, epoch, the attempt's first epoch)
    }
    first_attempt = [step for _, step, start in epochs if start == 0]
    resumed = sorted((when, start) for when, _, start in epochs if start > 0)
    if not resumed:
        outcome.finished = False
        return
    resumed_at, resumed_from = resumed[0]
    outcome.resumed_from_epoch = int(resumed_from)
    outcome.epochs_lost = max(0, max(first_attempt, default=-1) + 1 - int(resumed_from))
    outcome.recovery_s = round(resumed_at / 1000 - lost_at, 1)


def serve_through_node_loss(
    nodes: TwoNodeCluster, dashboard: str, export_dir: Path, load_s: float = 4.0
) -> ServeOutcome:
    """Two replicas, one per node (1 CPU each), under steady load; the worker node is lost."""
    from ray import serve

    from serving.deploy import deploy_app, wait_until_running

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    deploy_app(dashboard, classifier_app(export_dir, port, replicas=2))
    try:
        wait_until_running(dashboard, "dlpipe")
        outcome = ServeOutcome(_replica_nodes(), _replicas_answering(url))
        load = ThreadedLoad(url, SERVE_LOAD_CLIENTS)
        load.start()
        time.sleep(load_s)
        lost_at = time.time()
        nodes.replace_worker()
        outcome.replicas_back_s = replicas_running("dlpipe", "dlpipe", 2, lost_at, timeout_s=180)
        time.sleep(load_s)
        load.stop()
        outcome.requests, outcome.failed = load.sent, len(load.failures)
        outcome.failures = [what for _, what in load.failures[:5]]
        if load.failures:
            outcome.failure_window_s = round(max(t for t, _ in load.failures) - lost_at, 2)
        return outcome
    finally:
        serve.shutdown()


def _serve_replicas() -> list[Any]:
    from ray.util.state import list_actors

    return [
        actor
        for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        if actor.class_name.startswith("ServeReplica:dlpipe")
    ]


def _replica_nodes() -> list[str]:
    return sorted(actor.node_id for actor in _serve_replicas())


def _replicas_answering(url: str, tries: int = 40) -> int:
    """Replicas share the port (SO_REUSEPORT): new connections reach either one."""
    import httpx

    seen = set()
    for _ in range(tries):
        with httpx.Client(base_url=url, timeout=10) as client:
            seen.add(client.get("/v1/models").json()["replica"])
    return len(seen)


def export_model(root: Path, prepared: Path, tag: str) -> Path:
    """The `export` stage on a run's model: the ONNX folder the Serve app loads."""
    from pipelines.stagekit.config import ExportConfig
    from pipelines.supervised.export import export

    config = ExportConfig()
    out = root / tag
    export(
        config,
        config.registered_model,
        f"cluster-{tag}",
        str(prepared),
        str(out / "model"),
        str(out / "evaluate.json"),
        str(out / "export"),
        str(out / "export.json"),
    )
    return out / "export"


def run_scenario(root: Path) -> dict[str, Any]:
    """Undisturbed and disturbed training, then serving through a node loss; the results
    in benchmarks/results/cluster.json's keys."""
    root.mkdir(parents=True, exist_ok=True)
    prepared = prepare_digits(root)
    nodes = TwoNodeCluster()
    try:
        with environment(
            MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
            DLPIPE_STORAGE=str(root / "shared-storage"),
        ):
            dashboard = nodes.connect()
            started = time.monotonic()
            calm = train_and_evaluate(root, prepared, "undisturbed")
            calm_s = time.monotonic() - started
            started = time.monotonic()
            hit = train_and_evaluate(root, prepared, "node-loss", nodes)
            hit_s = time.monotonic() - started
            serving = serve_through_node_loss(
                nodes, dashboard, export_model(root, prepared, "node-loss")
            )
    finally:
        nodes.shutdown()
    return {
        "nodes": 2,
        "cpus_per_node": 1,
        "health_checks": HEALTH_CHECKS,
        "placement": {
            "undisturbed_worker_nodes": calm.worker_nodes,
            "node_loss_worker_nodes": hit.worker_nodes,
            "serve_replica_nodes": serving.replica_nodes,
            "serve_replicas_answering": serving.replicas_answering,
        },
        "epochs": EPOCHS,
        "undisturbed_test_accuracy": calm.test_accuracy,
        "node_loss_test_accuracy": hit.test_accuracy,
        "node_loss_survived": hit.finished and hit.epochs_run == EPOCHS,
        "accuracy_delta": round(hit.test_accuracy - calm.test_accuracy, 4),
        "epochs_lost": hit.epochs_lost,
        "resumed_from_epoch": hit.resumed_from_epoch,
        "recovery_s": hit.recovery_s,
        "undisturbed_train_s": round(calm_s, 1),
        "node_loss_train_s": round(hit_s, 1),
        "serve_requests": serving.requests,
        "serve_failed_requests": serving.failed,
        "serve_failure_window_s": serving.failure_window_s,
        "serve_replicas_back_s": serving.replicas_back_s,
        "serve_failure_kinds": sorted(set(serving.failures)),
    }


def main() -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dlpipe-cluster-") as workdir:
        results = run_scenario(Path(workdir))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "placement"}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
