"""Replica autoscaling on the requests the replicas' own HTTP servers hold.

Serve's default policy counts the requests Serve's router delivers; this app's requests
reach each replica's own server (serving/http_server.py), so Serve would see none. Each
replica reports its in-flight count instead (`record_autoscaling_stats` in serving/app.py),
Serve averages it over `look_back_period_s`, and this policy asks for as many replicas as
keep about `target_ongoing_requests` in flight on each. Serve applies the rest of the
deployment's `autoscaling_config` around it: min/max_replicas, up/downscale delays.

Replicas on one node share the HTTP port (SO_REUSEPORT): the kernel gives new connections
to any of them, so a client that keeps one connection open stays on its replica; load from
many connections spreads.
"""

from __future__ import annotations

from typing import Any

from ray.serve.config import AutoscalingContext

IN_FLIGHT = "in_flight"


def in_flight_policy(ctx: AutoscalingContext) -> tuple[float, dict[str, Any]]:
    """Desired replicas = requests in flight over all replicas / target per replica."""
    per_replica = (ctx.aggregated_metrics or {}).get(IN_FLIGHT, {})
    if not per_replica:  # no report yet (replicas starting): keep the current number
        return ctx.target_num_replicas, {}
    total = sum(per_replica.values())
    return total / ctx.config.get_target_ongoing_requests(), {}
