"""Serve replicas killed under a steady load: one of two (the other must take over; target:
no failures beyond the requests in flight on the killed one) and the only one (answering
again within 15 s). The same kill on an app behind Serve's own proxy, which retries, is
measured in the same run for comparison.

dlpipe's replicas answer HTTP themselves on one port (SO_REUSEPORT): a client whose
connection was on the killed replica sees that connection fail and reconnects to a live
one; Serve then starts a replacement.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

from benchmarks.loadgen import ThreadedLoad
from benchmarks.workspace import Workspace

CLIENTS = 4
LOAD_BEFORE_S = 3.0
LOAD_AFTER_S = 6.0
ONLY_REPLICA_TARGET_S = 15.0


def replica_killed(ws: Workspace, train_epochs: int) -> dict[str, Any]:
    """One of two dlpipe replicas, then the only one, SIGKILLed under load; and one of two
    replicas of an app behind Serve's proxy, for comparison."""
    export = exported_model(ws, train_epochs)
    dashboard = ws.env["RAY_DASHBOARD_ADDRESS"]
    one_of_two = _kill_dlpipe_replica(dashboard, export, replicas=2)
    only = _kill_dlpipe_replica(dashboard, export, replicas=1)
    proxy = _kill_behind_serve_proxy(export)
    met = (
        one_of_two["failed"] <= CLIENTS
        and only["answering_again_s"] is not None
        and only["answering_again_s"] <= ONLY_REPLICA_TARGET_S
    )
    return {
        "met": met,
        "target": f"1 of 2 killed: no failures beyond the killed replica's in-flight requests "
        f"(at most {CLIENTS}, one per client); the only one: answering again within "
        f"{ONLY_REPLICA_TARGET_S:g} s",
        "one_of_two": one_of_two,
        "only_replica": only,
        "serve_proxy_one_of_two": proxy,
    }


def graceful_operations(ws: Workspace, train_epochs: int) -> dict[str, Any]:
    """Under a steady load on the dlpipe app: a scale-down (2 -> 1 replicas), a redeploy with
    new settings (Serve replaces every replica, one at a time), and a stop of the whole app.
    Target: zero failed requests. After the stop, a new connection is refused (nothing
    listens any more): that is counted apart; a request the server accepted and then
    dropped is a failure."""
    from ray import serve

    from serving.deploy import deploy_app, wait_until_running

    export = exported_model(ws, train_epochs)
    dashboard = ws.env["RAY_DASHBOARD_ADDRESS"]
    port = free_port()
    app = classifier_app(export, port, replicas=2)
    deploy_app(dashboard, app)
    wait_until_running(dashboard, "dlpipe")
    load = ThreadedLoad(f"http://127.0.0.1:{port}", CLIENTS)
    load_started = time.time()
    load.start()
    phases: dict[str, tuple[float, float]] = {}
    try:
        time.sleep(LOAD_BEFORE_S)

        phases["steady"] = (load_started, time.time())

        def phase(name: str, change: dict[str, Any], replicas: int, fresh: bool = False) -> None:
            started = time.time()
            deploy_app(dashboard, change)
            _wait_for_replicas(dashboard, replicas, since=started, fresh=fresh)
            time.sleep(LOAD_AFTER_S)  # stragglers: connections closed late would fail now
            phases[name] = (started, time.time())

        app["deployments"][0]["num_replicas"] = 1
        phase("scale_down", app, 1)
        app["deployments"][0]["num_replicas"] = 2
        phase("scale_up", app, 2)
        app["args"]["http"]["drain_s"] = 2.5  # new settings: Serve replaces each replica
        phase("redeploy", app, 2, fresh=True)
        stopped_at = time.time()
        serve.delete("dlpipe")
        time.sleep(LOAD_AFTER_S)
        phases["stop"] = (stopped_at, time.time())
    finally:
        load.stop()
        serve.shutdown()
    report: dict[str, Any] = {"requests": load.sent}
    for name, (start, end) in phases.items():
        kinds = [what for at, what in load.failures if start <= at <= end]
        refused = sum(kind == "ConnectError" for kind in kinds) if name == "stop" else 0
        report[name] = {
            "seconds": round(end - start, 1),
            "failed": len(kinds) - refused,
            **({"refused_after_stop": refused} if name == "stop" else {}),
            "failure_kinds": sorted(set(kinds) - ({"ConnectError"} if name == "stop" else set())),
        }
    failed = sum(report[name]["failed"] for name in phases)
    return {
        "met": failed == 0 and len(phases) == 5,
        "target": "scale-down, redeploy and stop under load: zero failed requests (after "
        "the stop, refused connections are not failures)",
        "failed": failed,
        "tcp_migrate_req": _sysctl("net/ipv4/tcp_migrate_req"),
        **report,
    }


def _wait_for_replicas(
    dashboard: str, count: int, since: float, fresh: bool = False, timeout_s: float = 180
) -> None:
    """Until the app runs exactly `count` replicas and no other (`fresh`: all of them
    started after `since`, i.e. a redeploy has replaced every one)."""
    from serving.deploy import serve_details

    while time.time() - since < timeout_s:
        app = serve_details(dashboard).get("applications", {}).get("dlpipe", {})
        deployment = app.get("deployments", {}).get("dlpipe", {})
        replicas = deployment.get("replicas", [])
        states = [r["state"] for r in replicas]
        new = all(r.get("start_time_s", 0) > since for r in replicas)
        if app.get("status") == "RUNNING" and states == ["RUNNING"] * count and (new or not fresh):
            return
        time.sleep(0.5)
    raise RuntimeError(f"dlpipe did not settle on {count} replicas within {timeout_s} s")


def _sysctl(name: str) -> str | None:
    try:
        return open(f"/proc/sys/{name}").read().strip()
    except OSError:
        return None


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def classifier_app(export_dir: str, port: int, replicas: int) -> dict[str, Any]:
    """The dlpipe Serve app (a config, as `dlpipe serve` deploys it) serving only the
    classifier in `export_dir`, with `replicas` replicas answering on `port`."""
    return {
        "name": "dlpipe",
        "route_prefix": "/dlpipe",
        "import_path": "serving.app:build_app",
        "args": {
            "model": str(export_dir),
            "mlm_model": "none",
            "segment_model": "none",
            "http": {"port": port},
        },
        "deployments": [{"name": "dlpipe", "num_replicas": replicas}],
    }


def replicas_running(
    app: str, deployment: str, count: int, since: float, timeout_s: float = 120
) -> float | None:
    """Seconds from `since` until `count` replicas run again (after one went away)."""
    from ray import serve

    gone = False
    while time.time() - since < timeout_s:
        states = serve.status().applications[app].deployments[deployment].replica_states
        running = states.get("RUNNING", 0)
        gone = gone or running < count
        if gone and running >= count:
            return round(time.time() - since, 1)
        time.sleep(0.2)
    return None


def exported_model(ws: Workspace, train_epochs: int) -> str:
    ws.edit_params(lambda p: p["train"].update(epochs=train_epochs))
    ws.dvc("repro", "export")
    return str(ws.root / "artifacts" / "supervised" / "export")


def _kill_dlpipe_replica(dashboard: str, export: str, replicas: int) -> dict[str, Any]:
    from ray import serve

    from serving.deploy import deploy_app, wait_until_running

    port = free_port()
    deploy_app(dashboard, classifier_app(export, port, replicas))
    try:
        wait_until_running(dashboard, "dlpipe")
        return {
            "replicas": replicas,
            **_kill_one_under_load(port, "dlpipe", "dlpipe", replicas, probe=replicas == 1),
        }
    finally:
        serve.shutdown()


def _kill_behind_serve_proxy(export: str) -> dict[str, Any]:
    """benchmarks/servers/ray_default.py's app (FastAPI ingress through Serve's proxy) with
    two replicas, one SIGKILLed under the same load."""
    from ray import serve

    from benchmarks.servers.ray_default import Classifier

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(
            Classifier.options(num_replicas=2, max_ongoing_requests=32).bind(export),
            name="proxy",
            route_prefix="/",
        )
        return _kill_one_under_load(port, "proxy", "Classifier", 2, probe=False)
    finally:
        serve.shutdown()


def _kill_one_under_load(
    port: int, app: str, deployment: str, replicas: int, probe: bool
) -> dict[str, Any]:
    """SIGKILL one replica of `app` under CLIENTS clients; what failed, and how long until
    an answer (`probe`) and full capacity came back."""
    url = f"http://127.0.0.1:{port}"
    load = ThreadedLoad(url, CLIENTS)
    load.start()
    time.sleep(LOAD_BEFORE_S)
    [victim, *_] = replica_pids(f"ServeReplica:{app}")
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    answering = _first_success_after(url, killed_at) if probe else None
    # The only replica: answering again is full capacity (Serve may show the replacement
    # RUNNING before a poll ever sees none running).
    back = answering if probe else replicas_running(app, deployment, replicas, killed_at)
    time.sleep(LOAD_AFTER_S)
    load.stop()
    failures = [t for t, _ in load.failures if t >= killed_at]
    return {
        "requests": load.sent,
        "failed": len(load.failures),
        "failed_after_kill": len(failures),
        "failure_window_s": round(max(failures) - killed_at, 2) if failures else 0.0,
        "failure_kinds": sorted({what for _, what in load.failures})[:5],
        "answering_again_s": answering,
        "full_capacity_again_s": back,
    }


def replica_pids(prefix: str) -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
    return [a.pid for a in actors if a.class_name.startswith(prefix)]


def _first_success_after(url: str, since: float, timeout_s: float = 60) -> float | None:
    import httpx

    body = {"instances": [[0.5] * 64]}
    while time.time() - since < timeout_s:
        try:
            if httpx.post(f"{url}/v1/classify", json=body, timeout=2).status_code == 200:
                return round(time.time() - since, 1)
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return None
