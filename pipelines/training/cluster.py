"""Connecting to Ray: a local instance by default, the cluster named by RAY_ADDRESS otherwise."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from pipelines.stagekit.errors import UserError

log = logging.getLogger(__name__)


def connect_ray() -> str | None:
    """Start or join Ray once per process. Set RAY_ADDRESS (e.g. ray://head:10001) for a
    cluster. Returns the dashboard's URL when this call started or joined Ray and Ray
    reported one (None otherwise)."""
    import ray

    if ray.is_initialized():
        return None
    address = os.environ.get("RAY_ADDRESS") or None  # set but empty: start a local Ray
    context = ray.init(
        address=address,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and "://" not in url else url


LOCAL_RAY_ENV = "DLPIPE_LOCAL_RAY"
"""Set beside RAY_ADDRESS for the stages of `dlpipe run` (`local_ray_for_stages`): the
address names the local instance that command started, whose CPUs will not grow."""


def joined_cluster() -> bool:
    """Whether this process joined an existing cluster (RAY_ADDRESS), which may autoscale,
    rather than starting a local one (or joining the one `dlpipe run` started for it)."""
    if os.environ.get(LOCAL_RAY_ENV):
        return False
    return os.environ.get("RAY_ADDRESS", "") not in ("", "local")


SIDE_BY_SIDE_ENV = "DLPIPE_STAGES_SIDE_BY_SIDE"
"""Set by `dlpipe run --jobs` (pipelines/stagekit/dag.py): sibling stages hold the CPUs."""
WORKER_WAIT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
LOCAL_WAIT_S = 120.0
CLUSTER_WAIT_S = 600.0
SIDE_BY_SIDE_WAIT_S = 3600.0


def resource_wait_s() -> float:
    """How long a stage waits for Ray to place its actors before it says they will not
    come, naming what holds the CPUs: on a local instance of its own they would never
    come (CPUs held by another job, or by a group that outlived its job); a cluster that
    autoscales gets time to add nodes; beside other stages of a `dlpipe run --jobs` on its
    local instance, they come when a sibling's job ends (an hour: longer than any stage
    of the demo trains)."""
    if os.environ.get(SIDE_BY_SIDE_ENV):
        return SIDE_BY_SIDE_WAIT_S
    return CLUSTER_WAIT_S if joined_cluster() else LOCAL_WAIT_S


@contextlib.contextmanager
def local_ray_for_stages(side_by_side: bool = False) -> Iterator[dict[str, str]]:
    """One local Ray instance, in this process, for every stage a command runs; yields the
    environment variables that make the stages join it (none when RAY_ADDRESS names a
    cluster: the stages then go there; `local` asks for a new local instance, which they
    then share). On 2 CPUs a training stage that starts its own Ray (and the dashboard's
    processes) took about 4 s longer on average, 0 to 7 s, than one joining a running
    instance (benchmarks/README.md, pipeline overhead). The dashboard stays on: Ray Train's placement-group cleaner
    asks the State API it serves, and without it a group Tune stops early would leak into
    the next stage. With RAY_ADDRESS unset, `ray.init` joins an instance that `ray start`
    left running on this machine instead, as each stage did before; this process then
    only disconnects from it at the end. `side_by_side`: the stages run at once
    (`dlpipe run --jobs`), and wait for each other's CPUs (`resource_wait_s`)."""
    address = os.environ.get("RAY_ADDRESS", "")
    if address not in ("", "local"):
        yield {}
        return
    import ray

    # Side by side, a Train job waits for a sibling's workers for as long as they train,
    # where Ray Train gives up after 60 s and starts the job over. Ray's processes take
    # the variable from this one's environment, set before they start.
    if side_by_side:
        os.environ.setdefault(WORKER_WAIT_ENV, f"{SIDE_BY_SIDE_WAIT_S:g}")
    # The stages print their own workers' logs; this driver runs no work of its own.
    context = ray.init(
        address=address or None,
        log_to_driver=False,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    try:
        yield {"RAY_ADDRESS": context.address_info["gcs_address"], LOCAL_RAY_ENV: "1"}
    finally:
        ray.shutdown()


def cluster_gpus() -> float:
    """GPUs the connected Ray cluster has (0 without any)."""
    import ray

    return ray.cluster_resources().get("GPU", 0)


@dataclass(frozen=True)
class Placement:
    """Where the workers of a run (a training job, a Tune trial, the Serve replicas) go."""

    gpus_per_worker: float
    """0: CPU workers; 1: a GPU each; a fraction: workers share GPUs."""
    summary: str
    """One line for the log, e.g. "2 workers on 1 GPU(s): 0.5 GPU each"."""

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


def gpu_share(gpus: float, workers: int) -> float:
    """The GPU each of `workers` gets so that all of them fit on `gpus` GPUs at once: a
    whole one when there are enough, else 1/k for k workers per GPU. Not gpus/workers:
    Ray fits a fraction of a GPU on one GPU, so 4 workers of 0.75 would not fit on 3."""
    if workers <= gpus:
        return 1.0
    return 1.0 / math.ceil(workers / max(gpus, 1))


def place_workers(
    device: Literal["auto", "cpu", "gpu"], workers: int, key: str, workers_at_once: int = 0
) -> Placement:
    """Where `workers` workers run for a `device` setting (`key` names it in errors):

    - cpu, or auto on a cluster without GPUs: one CPU each;
    - auto or gpu with G GPUs: every worker gets a GPU share, sized so that
      `workers_at_once` (default `workers`; a search's concurrent trials need more) fit;
    - gpu without any GPU: a UserError naming `key`, unless this process joined a cluster
      that may still add GPU nodes (it then waits for one GPU per worker)."""
    at_once = max(workers_at_once, workers)
    if device == "cpu":
        return Placement(0.0, f"{workers} worker(s) on CPU ({key}: cpu)")
    gpus = cluster_gpus()
    if gpus < 1:
        if device == "auto":
            return Placement(0.0, f"{workers} worker(s) on CPU (the Ray cluster has no GPU)")
        if not joined_cluster():
            raise UserError(
                f"{key}: gpu, but the Ray cluster has no GPU; set {key}: auto (a GPU when "
                "the cluster has one, else CPU) or cpu"
            )
        log.warning("%s: gpu, but the Ray cluster has no GPU yet; waiting for one", key)
        return Placement(1.0, f"{workers} worker(s), a GPU each (waiting for GPU nodes)")
    share = gpu_share(gpus, at_once)
    if share == 1.0:
        return Placement(1.0, f"{workers} worker(s), a GPU each ({gpus:g} GPU(s) in the cluster)")
    return Placement(
        share,
        f"{at_once} worker(s) at once on {gpus:g} GPU(s): {share:g} GPU each",
    )


def state_api_answers() -> bool:
    """Whether Ray's State API (served by the dashboard) answers on the connected cluster."""
    from ray.util.state import list_actors

    try:
        list_actors(limit=1, timeout=10, raise_on_missing_output=False)
    except Exception:  # the dashboard is off or unreachable: any failure means "no"
        return False
    return True


def require_resources(kind: str, count: int, what: str, hint: str) -> None:
    """Fail before asking for `count` CPUs/GPUs that a local cluster could never place (Ray
    would leave the actors pending forever). `what` names the setting; `hint` the way out."""
    import ray

    available = ray.cluster_resources().get(kind, 0)
    if available >= count:
        return
    message = f"{what} needs {count} {kind}(s); the Ray cluster has {available:g}"
    if joined_cluster():  # an autoscaling cluster may still add nodes
        log.warning("%s; waiting for the cluster to scale up", message)
        return
    raise UserError(f"{message}; {hint}")


def orphaned_placement_groups(job_id: str | None = None) -> list[str]:
    """Ids of the placement groups still holding resources that an actor created and then
    died without removing (of job `job_id`, a hex id, or of any job). Needs a process
    connected to the cluster as a driver or worker (not Ray Client).

    Ray removes an actor's placement groups with its job, but a group that reaches the GCS
    after its creator actor died is kept for good. Groups a driver created (Tune's trial
    groups: no creator actor) and detached ones (Serve's) are never listed. Ray's public
    table leaves out who created a group, hence the GCS records read here."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    no_actor = ray.ActorID.nil().binary()
    job = ray.JobID.from_hex(job_id).binary() if job_id else None
    orphans = []
    for record in state._connect_and_get_accessor().get_placement_group_table():
        data = gcs_pb2.PlacementGroupTableData.FromString(record)
        if (
            data.state != gcs_pb2.PlacementGroupTableData.REMOVED
            and data.creator_actor_id not in (b"", no_actor)
            and data.creator_actor_dead
            and not data.is_detached
            and (job is None or data.creator_job_id == job)
        ):
            orphans.append(ray.PlacementGroupID(data.placement_group_id).hex())
    return orphans


def _remove_orphans_of_job(job_id: str, settle_s: float, limit_s: float) -> int:
    import time

    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    quiet_since = started = time.monotonic()
    while time.monotonic() - quiet_since < settle_s and time.monotonic() - started < limit_s:
        for pg_id in orphaned_placement_groups(job_id):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
            removed += 1
            quiet_since = time.monotonic()
        time.sleep(0.25)
    return removed


def remove_orphaned_placement_groups(settle_s: float = 2.0, limit_s: float = 15.0) -> int:
    """Remove this job's orphaned placement groups (see `orphaned_placement_groups`);
    returns how many. Called when a Tune search ends.

    Why: when Tune stops a trial while its Ray Train controller is starting a worker group,
    the group's placement group can outlive the controller (seen in CI with Ray 2.60: one
    CPU of two held for the rest of the session, and the next stage's actors pending
    forever). Polls until none has appeared for `settle_s`: the late request lands within
    a second or so of the trial's end. Runs as a task on the cluster, so that it also
    works from a Ray Client (ray://) driver."""
    import ray

    job = ray.get_runtime_context().get_job_id()
    task = ray.remote(num_cpus=0, max_retries=0)(_remove_orphans_of_job)
    removed = ray.get(task.remote(job, settle_s, limit_s))
    if removed:
        log.info("removed %d placement group(s) that stopped trials left behind", removed)
    return removed
