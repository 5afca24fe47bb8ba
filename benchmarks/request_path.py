"""CPU per request of dlpipe's own request path, without HTTP or Ray: what a replica's
ASGI app (serving/http_api.py's HttpApi, the batcher, the metrics, drift watching)
spends answering one `/v1/classify` request, beside the same app with a no-op model.

The serving benchmark (serving_throughput.py) measures the whole stack over HTTP and
takes ~20 minutes; on this 2-CPU machine its runs differ by up to a third. This one drives
the app in one process: `--clients` coroutines each send their next request as soon as
their answer is written, as wrk's connections do, so the batcher forms batches as under
that load. It takes about 25 s, and its figures are steady enough to compare two
versions of the code (run each several times, interleaved; benchmarks/README.md).

The app is the replica's (serving/app.py's batchers and metrics; Ray's metrics API
records without a cluster); uvicorn's part (parsing HTTP, writing the answer) is not in
it: the echo server of serving_throughput.py measures that.

Servers measured, each `--rounds` times, interleaved; the figure is the median round:
- `classify`: the exported classifier, drift watched (the default);
- `classify_unwatched`: the same with drift watching off;
- `noop`: the no-op classifier (benchmarks/servers/noop_model.py), drift watched;
- `classify_captured`: `classify` with request capture at rate 1 (serving/capture.py:
  every request and answer written to JSON lines in a scratch directory), its writer
  thread's CPU included (a round ends when the writer has caught up);
- `classify_captured_1pct`: the same at rate 0.01, the README's example setting.

    python -m benchmarks.request_path     # writes benchmarks/results/request_path.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "request_path.json"
CLASSIFY = "/v1/classify"


def build_app(export_dir: str, watched: bool, capture: Any = None) -> Any:
    """The replica's ASGI app over the export at `export_dir`, as serving/app.py builds it;
    `capture` a serving/capture.py `CaptureConfig` to capture requests with."""
    from serving.app import batched_calls, route_batchers
    from serving.capture import RequestCapture
    from serving.drift import DriftConfig
    from serving.http_api import HttpApi, Limits
    from serving.metrics import ServingMetrics
    from serving.model_slots import LoadedModels
    from serving.model_source import resolve_model
    from serving.predictor import ClassifierPredictor

    models = LoadedModels(classifier=ClassifierPredictor(resolve_model(export_dir)))
    models.configure_drift(DriftConfig(enabled=watched))
    limits = Limits()
    metrics = ServingMetrics(drift=models.drift_gauges)
    batchers = route_batchers(metrics, limits.request_timeout_s)
    api = HttpApi(models, limits, batched_calls(batchers), metrics=metrics)
    if capture is not None:
        api.capture = RequestCapture(capture)
    return api


async def drive(app: Any, body: bytes, clients: int, requests: int) -> float:
    """CPU seconds per request of `clients` coroutines sending `requests` each."""
    scope = {
        "type": "http",
        "method": "POST",
        "path": CLASSIFY,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    message = {"type": "http.request", "body": body, "more_body": False}
    failures = []

    async def receive() -> dict[str, Any]:
        return message

    async def send(event: dict[str, Any]) -> None:
        if event["type"] == "http.response.start" and event["status"] != 200:
            failures.append(event["status"])

    async def client() -> None:
        for _ in range(requests):
            await app(dict(scope), receive, send)

    started = time.process_time()
    await asyncio.gather(*(client() for _ in range(clients)))
    capture = getattr(app, "capture", None)
    while capture is not None and capture.backlog:  # the writer's CPU is this app's
        await asyncio.sleep(0.001)
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. HTTP {failures[0]}")
    return (time.process_time() - started) / (clients * requests)


def measure(
    apps: dict[str, Any], body: bytes, clients: int, requests: int, rounds: int
) -> dict[str, list[float]]:
    """name -> each round's microseconds per request, the apps taking turns each round."""
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    runs: dict[str, list[float]] = {name: [] for name in apps}
    for app in apps.values():  # warm-up: first batches, caches, the metrics' timer
        loop.run_until_complete(drive(app, body, clients, 20))
    for round_number in range(1, rounds + 1):
        for name, app in apps.items():
            seconds = loop.run_until_complete(drive(app, body, clients, requests))
            runs[name].append(round(seconds * 1e6, 1))
        print(f"round {round_number}: " + ", ".join(f"{n} {v[-1]} us" for n, v in runs.items()))
    # The batchers' tasks wait for requests forever: stopped before the loop closes.
    waiting = asyncio.all_tasks(loop)
    for task in waiting:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*waiting, return_exceptions=True))
    loop.close()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--export", default="artifacts/supervised/export")
    parser.add_argument("--data", default="data/prepared/supervised")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=300, help="per client and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()

    from benchmarks.scratch import write_results
    from benchmarks.servers.noop_model import write_noop_classifier
    from benchmarks.serving_throughput import request_bodies
    from serving.capture import CaptureConfig

    body = request_bodies(args.data)[CLASSIFY]
    scratch = Path(tempfile.mkdtemp(prefix="dlpipe-request-path-"))
    noop = write_noop_classifier(Path(args.export), scratch / "noop_classifier")

    def captured(rate: float) -> Any:
        config = CaptureConfig(rate=rate, directory=str(scratch / f"captures-{rate:g}"))
        return build_app(args.export, watched=True, capture=config)

    apps = {
        "classify": build_app(args.export, watched=True),
        "classify_unwatched": build_app(args.export, watched=False),
        "noop": build_app(str(noop), watched=True),
        "classify_captured": captured(1.0),
        "classify_captured_1pct": captured(0.01),
    }
    runs = measure(apps, body, args.clients, args.requests, args.rounds)
    capture = apps["classify_captured"].capture
    figures: dict[str, Any] = {
        name: {"us_per_request": statistics.median(values), "runs_us": values}
        for name, values in runs.items()
    }
    classify = figures["classify"]["us_per_request"]
    figures["model_us"] = round(classify - figures["noop"]["us_per_request"], 1)
    figures["drift_us"] = round(classify - figures["classify_unwatched"]["us_per_request"], 1)
    figures["capture_us"] = round(figures["classify_captured"]["us_per_request"] - classify, 1)
    figures["capture_1pct_us"] = round(
        figures["classify_captured_1pct"]["us_per_request"] - classify, 1
    )
    # Rate 1 at full speed: every request offered, none may be dropped or fail to write.
    figures["capture_counts"] = {
        key: capture.status()[key] for key in ("captured", "dropped", "failed", "written")
    }
    figures["clients"] = args.clients
    rows = [
        f"| {name} | {figures[name]['us_per_request']:.1f} | "
        f"{min(runs[name]):.1f}-{max(runs[name]):.1f} |"
        for name in runs
    ]
    table = "\n".join(
        ["| app | us per request | range |", "|---|---|---|", *rows]
        + [
            "",
            f"The model's share: {figures['model_us']} us a request (classify - noop); "
            f"drift watching's: {figures['drift_us']} us (classify - classify_unwatched); "
            f"capturing every request: {figures['capture_us']} us "
            f"(classify_captured - classify; {figures['capture_counts']}), 1% of them: "
            f"{figures['capture_1pct_us']} us.",
        ]
    )
    write_results(
        args.output,
        figures,
        table,
        f"The replica's ASGI app in one process (no HTTP, no Ray cluster), {args.clients} "
        f"concurrent clients x {args.requests} requests per round, median of {args.rounds} "
        "interleaved rounds; CPU time (process_time) per request; one 8x8 digit per request.",
    )


if __name__ == "__main__":
    main()
