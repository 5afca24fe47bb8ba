"""A long steady load on the Serve app: 10 minutes at about 70% of its measured maximum.

What must hold: zero failed requests; p99 latency stable (the last minute's within 1.5x of
the first's); each replica's memory (RSS) growing less than 10% from the end of the first
minute (warm-up: lazy imports, onnxruntime's arenas) to the end.

The load is wrk's, in one-minute rounds back to back, each client pausing between requests
so that the rate lands near the target (benchmarks/loadgen.py); the rate reached is reported.
"""

from __future__ import annotations

import time
from typing import Any

import psutil

from benchmarks.faults.serving import (
    classifier_app,
    exported_model,
    free_port,
    replica_pids,
)
from benchmarks.loadgen import run_load
from benchmarks.workspace import Workspace

CLIENTS = 32
SHARE = 0.7
P99_DRIFT = 1.5
MEMORY_GROWTH = 0.10
RATE_TOLERANCE = 0.15
"""The rate reached must be within this share of the target (wrk's pauses are whole ms)."""


def _pace(url: str, body: bytes, target: float, tries: int = 3) -> float:
    """The pause per request that brings CLIENTS clients to about `target` requests/s: each
    client's period is CLIENTS / target, less an answer's own time at that load, which
    only a short run at that load tells (10 s per try)."""
    period_ms = 1000 * CLIENTS / target
    pause_ms = float(round(period_ms))
    for _ in range(tries):
        rps = run_load(url, body, CLIENTS, 10, pause_ms=pause_ms)["rps"]
        answer_ms = max(0.0, 1000 * CLIENTS / rps - pause_ms)
        pause_ms = float(max(0, round(period_ms - answer_ms)))  # wrk pauses in whole ms
    return pause_ms


def soak(ws: Workspace, train_epochs: int, minutes: int = 10, replicas: int = 2) -> dict[str, Any]:
    from ray import serve

    from serving.deploy import deploy_app, wait_until_running

    export = exported_model(ws, train_epochs)
    dashboard = ws.env["RAY_DASHBOARD_ADDRESS"]
    port = free_port()
    deploy_app(dashboard, classifier_app(export, port, replicas))
    try:
        wait_until_running(dashboard, "dlpipe")
        url = f"http://127.0.0.1:{port}/v1/classify"
        body = b'{"instances": [[' + b", ".join([b"0.5"] * 64) + b"]]}"
        run_load(url, body, 8, 5)  # warm-up
        peak = run_load(url, body, 32, 15)
        target = SHARE * peak["rps"]
        pause_ms = _pace(url, body, target)
        pids = replica_pids("ServeReplica:dlpipe")
        rounds, memory = [], []
        for _ in range(minutes):
            rounds.append(run_load(url, body, CLIENTS, 60, pause_ms=pause_ms))
            memory.append({pid: psutil.Process(pid).memory_info().rss for pid in pids})
            time.sleep(0.1)
    finally:
        serve.shutdown()
    errors = sum(r["errors"] for r in rounds)
    rate = sum(r["rps"] for r in rounds) / len(rounds)
    drift = rounds[-1]["p99_ms"] / rounds[0]["p99_ms"]
    growth = max(memory[-1][pid] / memory[0][pid] - 1 for pid in pids)
    return {
        "met": errors == 0
        and drift <= P99_DRIFT
        and growth < MEMORY_GROWTH
        and abs(rate / target - 1) <= RATE_TOLERANCE,
        "target": f"{minutes} min at ~{SHARE:.0%} of the peak: 0 errors, last minute's p99 "
        f"within {P99_DRIFT}x of the first's, replica memory growth < {MEMORY_GROWTH:.0%} "
        "after the first minute",
        "peak_rps": peak["rps"],
        "target_rps": round(target, 1),
        "mean_rps": round(rate, 1),
        "pause_ms": round(pause_ms, 2),
        "rps_per_minute": [r["rps"] for r in rounds],
        "p99_ms_per_minute": [r["p99_ms"] for r in rounds],
        "errors": errors,
        "p99_last_over_first": round(drift, 2),
        "replica_rss_mb": [
            [round(m[pid] / 2**20, 1) for pid in pids] for m in (memory[0], memory[-1])
        ],
        "memory_growth": round(growth, 4),
    }
