"""Connecting to Ray: a local instance by default, the cluster named by RAY_ADDRESS otherwise."""

from __future__ import annotations

import logging
import os

from pipelines.errors import UserError

log = logging.getLogger(__name__)


def connect_ray() -> str | None:
    """Start or join Ray once per process. Set RAY_ADDRESS (e.g. ray://head:10001) for a
    cluster. Returns the dashboard's URL when this call started or joined Ray and Ray
    reported one (None otherwise)."""
    import ray

    if ray.is_initialized():
        return None
    address = os.environ.get("RAY_ADDRESS")
    context = ray.init(
        address=address,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and "://" not in url else url


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


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
    if os.environ.get("RAY_ADDRESS"):  # an autoscaling cluster may still add nodes
        log.warning("%s; waiting for the cluster to scale up", message)
        return
    raise UserError(f"{message}; {hint}")
