"""Connecting to Ray: a local instance by default, the cluster named by RAY_ADDRESS otherwise."""

from __future__ import annotations

import logging
import os


def connect_ray() -> None:
    """Start or join Ray once per process. Set RAY_ADDRESS (e.g. ray://head:10001) for a cluster."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    ray.init(
        address=address,
        logging_level=logging.WARNING,
        configure_logging=True,
    )


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1
