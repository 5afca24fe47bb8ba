"""Requests/s and latency of the classify endpoint: dlpipe's Serve app against what a user
would run instead, side by side in one invocation.

Servers, each started in its own process (and, for the Ray ones, its own local Ray
cluster), measured one after the other with the same request and load generator:

- `dlpipe`: `dlpipe serve` with the exported classifier (what `make serve` runs), held
  at one replica;
- `bare`: the same ONNX model in one bare uvicorn/Starlette process: the reference limit;
- `naive`: FastAPI + the torch model in eager mode, as a user would first write it;
- `ray_default`: a FastAPI ingress on Ray Serve with Serve's defaults.

Each gets closed-loop load from wrk (benchmarks/loadgen.py) at 1, 8, 32 and 128 concurrent
clients. The whole sequence runs `--rounds` times (default 3) and each figure is the median
round's for that server and level (its requests/s and the latencies measured with it);
`rps_min` / `rps_max` keep the spread and `errors` sums every round. On this 2-core machine
runs of the same server and level differ by up to a third, more than the gaps the targets
compare, so one run is not a figure. Run from the repository root after `dvc repro export`:

    python -m benchmarks.serving_throughput      # writes benchmarks/results/serving.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchmarks.loadgen import run_load, wrk_path
from benchmarks.scratch import markdown_table, write_results

RESULTS = Path("benchmarks/results/serving.json")
CONCURRENCY = (1, 8, 32, 128)
START_TIMEOUT_S = 240
SETTLE_S = 15  # after a server stops: its Ray processes (GCS, dashboard) exit meanwhile


@dataclass(frozen=True)
class Server:
    name: str
    command: list[str]
    port: int
    env: dict[str, str]


def servers(export_dir: str, model_dir: str) -> list[Server]:
    python = sys.executable
    # RAY_ADDRESS=local: each Ray server starts its own cluster, never joins another one.
    ray_env = {"RAY_ADDRESS": "local"}
    return [
        Server(
            "dlpipe",
            [
                python,
                "-m",
                "pipelines.cli",
                "serve",
                "--model",
                export_dir,
                "--mlm-model",
                "none",
                "--segment-model",
                "none",
                "--port",
                "8100",
                # One replica, like the bare process: on 2 CPUs wrk needs the other one, and
                # a second replica would only take CPU from wrk (measured: autoscaling added
                # one at 128 clients and throughput fell below 32 clients').
                "--max-replicas",
                "1",
            ],  # fmt: skip
            8100,
            ray_env,
        ),
        Server(
            "bare",
            [python, "-m", "benchmarks.servers.bare", "--model", export_dir, "--port", "8101"],
            8101,
            {},
        ),
        Server(
            "naive",
            [python, "-m", "benchmarks.servers.naive", "--model", model_dir, "--port", "8102"],
            8102,
            {},
        ),
        Server(
            "ray_default",
            [
                python,
                "-m",
                "benchmarks.servers.ray_default",
                "--model",
                export_dir,
                "--port",
                "8103",
            ],  # fmt: skip
            8103,
            ray_env,
        ),
    ]


def request_body(prepared: str) -> bytes:
    """One real test image of the prepared digits (pixels in [0, 1]) as a classify request."""
    from pipelines.stagekit.dataset import load_prepared

    image = load_prepared(prepared).x("test")[0].reshape(-1).astype(float)
    return json.dumps({"instances": [image.round(4).tolist()]}).encode()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def running(server: Server, log_dir: Path) -> Iterator[str]:
    """The server started and answering /healthz; its base URL. Stopped afterwards."""
    log = (log_dir / f"{server.name}.log").open("w")
    process = subprocess.Popen(
        server.command,
        env={**os.environ, **server.env},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stopped with everything it started
    )
    base = f"http://127.0.0.1:{server.port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(f"{base}/healthz"):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{server.name} did not start; see {log.name}")
            time.sleep(1)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        time.sleep(SETTLE_S)


def measure(server: Server, body: bytes, seconds: float, log_dir: Path) -> dict[str, dict]:
    with running(server, log_dir) as base:
        url = f"{base}/v1/classify"
        run_load(url, body, 8, 3)  # warm-up: lazy imports, onnxruntime's first runs
        figures = {}
        for clients in CONCURRENCY:
            figures[str(clients)] = run_load(url, body, clients, seconds)
            print(f"  {server.name:12s} {clients:4d} clients: {figures[str(clients)]}", flush=True)
    return figures


def table(results: dict[str, dict[str, dict]]) -> str:
    return markdown_table(
        ("server", "clients", "requests/s", "min-max", "p50 ms", "p99 ms", "errors"),
        (
            (
                name,
                clients,
                f"{f['rps']:.0f}",
                f"{f['rps_min']:.0f}-{f['rps_max']:.0f}",
                f"{f['p50_ms']:.2f}",
                f"{f['p99_ms']:.2f}",
                f["errors"],
            )
            for name, by_clients in results.items()
            for clients, f in by_clients.items()
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--export", default="artifacts/supervised/export")
    parser.add_argument("--model", default="artifacts/supervised/model")
    parser.add_argument("--data", default="data/prepared/supervised")
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    parser.add_argument("--servers", default="dlpipe,bare,naive,ray_default")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    wrk_path()
    body = request_body(args.data)
    wanted = args.servers.split(",")
    log_dir = Path(tempfile.mkdtemp(prefix="dlpipe-serving-logs-"))
    print(f"server logs in {log_dir}", flush=True)
    rounds: dict[str, list[dict[str, dict]]] = {}
    for round_number in range(1, args.rounds + 1):
        for server in servers(args.export, args.model):
            if server.name not in wanted:
                continue
            print(f"round {round_number}: {server.name}", flush=True)
            rounds.setdefault(server.name, []).append(measure(server, body, args.seconds, log_dir))
    results = {name: median_round(runs) for name, runs in rounds.items()}
    write_results(
        args.output,
        results,
        table(results),
        f"wrk, {args.seconds:g} s per level, median of {args.rounds} rounds (requests/s min-max "
        "beside it), one 8x8 digit (64 features) per request.",
    )


def median_round(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """Per concurrency level: the median run's figures, the spread of requests/s and the
    errors of all runs."""
    merged = {}
    for clients in runs[0]:
        level = sorted((run[clients] for run in runs), key=lambda f: f["rps"])
        merged[clients] = {
            **level[(len(level) - 1) // 2],
            "rps_min": level[0]["rps"],
            "rps_max": level[-1]["rps"],
            "errors": sum(f["errors"] for f in level),
        }
    return merged


if __name__ == "__main__":
    main()
