"""Requests/s and latency of the classify endpoint: dlpipe's Serve app against what a user
would run instead, side by side in one invocation.

Servers, each started in its own process (and, for the Ray ones, its own local Ray
cluster), measured one after the other with the same request and load generator:

- `dlpipe`: `dlpipe serve` with the exported classifier (what `make serve` runs), held
  at one replica;
- `bare`: the same ONNX model in one bare uvicorn/Starlette process: the reference limit;
- `naive`: FastAPI + the torch model in eager mode, as a user would first write it;
- `ray_default`: a FastAPI ingress on Ray Serve with Serve's defaults;
- `noop`: `dlpipe serve` as `dlpipe`, with a no-op model (benchmarks/servers/noop_model.py:
  a graph that answers fixed probabilities): everything dlpipe does for a request but the
  model, its own ceiling;
- `echo`: a raw ASGI app on uvicorn (uvloop + httptools) that reads the body and answers a
  fixed document the size of dlpipe's answer (benchmarks/servers/echo.py): the HTTP
  stack's ceiling; `echo_granian` the same app on granian, the server compared.

and the transformer path, `/v1/embed` with a batch of 8 short texts: `dlpipe_embed` (the
exported encoder), `noop_embed` (a no-op encoder: tokenizing, no graph work) and
`echo_embed` (an answer of 8 embeddings). `shares_at_32` in the results is dlpipe's
requests/s at 32 clients as a share of each ceiling.

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


CLASSIFY, EMBED = "/v1/classify", "/v1/embed"
SHARES = {  # shares_at_32: dlpipe's server -> the ceilings it is a share of
    "dlpipe": ("echo", "noop"),
    "dlpipe_embed": ("echo_embed", "noop_embed"),
}


@dataclass(frozen=True)
class Server:
    name: str
    command: list[str]
    port: int
    env: dict[str, str]
    route: str = CLASSIFY


def dlpipe_serve(
    port: int, classifier: str, encoder: str = "none", segmenter: str = "none"
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipelines.cli",
        "serve",
        "--model",
        classifier,
        "--mlm-model",
        encoder,
        "--segment-model",
        segmenter,
        "--generator-model",
        "none",
        "--port",
        str(port),
        # One replica, like the bare process: on 2 CPUs wrk needs the other one, and
        # a second replica would only take CPU from wrk (measured: autoscaling added
        # one at 128 clients and throughput fell below 32 clients').
        "--max-replicas",
        "1",
    ]


def echo(server: str, port: int, answer: Path) -> tuple[list[str], dict[str, str]]:
    """The echo app on `server` (uvicorn or granian), one process, one event loop."""
    app = "benchmarks.servers.echo:app_from_env"
    if server == "uvicorn":
        command = ["-m", "uvicorn", "--factory", app, "--loop", "uvloop", "--http", "httptools"]
        command += ["--no-access-log", "--log-level", "warning", "--port", str(port)]
    else:
        command = ["-m", "granian", "--interface", "asgi", "--factory", app, "--loop", "uvloop"]
        command += ["--workers", "1", "--runtime-threads", "1", "--no-ws"]
        command += ["--log-level", "warning", "--port", str(port)]
    return [sys.executable, *command], {"DLPIPE_ECHO_ANSWER": str(answer)}


def servers(
    export_dir: str, model_dir: str, encoder_dir: str, scratch: Path, answers: dict[str, Path]
) -> list[Server]:
    from benchmarks.servers.noop_model import write_noop_classifier, write_noop_encoder

    python = sys.executable
    # RAY_ADDRESS=local: each Ray server starts its own cluster, never joins another one.
    ray_env = {"RAY_ADDRESS": "local"}
    noop_classifier = write_noop_classifier(Path(export_dir), scratch / "noop_classifier")
    noop_encoder = write_noop_encoder(Path(encoder_dir), scratch / "noop_encoder")
    echo_classify = echo("uvicorn", 8104, answers[CLASSIFY])
    echo_granian = echo("granian", 8105, answers[CLASSIFY])
    echo_embed = echo("uvicorn", 8108, answers[EMBED])
    return [
        Server("dlpipe", dlpipe_serve(8100, export_dir), 8100, ray_env),
        Server("noop", dlpipe_serve(8106, str(noop_classifier)), 8106, ray_env),
        Server("echo", *echo_classify[:1], 8104, echo_classify[1]),
        Server("echo_granian", *echo_granian[:1], 8105, echo_granian[1]),
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
        Server("dlpipe_embed", dlpipe_serve(8107, export_dir, encoder_dir), 8107, ray_env, EMBED),
        Server(
            "noop_embed",
            dlpipe_serve(8109, str(noop_classifier), str(noop_encoder)),
            8109,
            ray_env,
            EMBED,
        ),
        Server("echo_embed", *echo_embed[:1], 8108, echo_embed[1], EMBED),
    ]


# /v1/embed's request: a batch of short texts, as a search box or a deduplication job sends.
TEXTS = [
    "the list is sorted in place",
    "open a file and read its lines",
    "a dictionary maps keys to values",
    "the loop ends when the iterator is exhausted",
    "an exception is raised when the key is missing",
    "the function returns a new string",
    "import the module before calling it",
    "the class defines a method for comparison",
]


def request_bodies(prepared: str) -> dict[str, bytes]:
    """One real test image of the prepared digits (pixels in [0, 1]) as a classify request;
    TEXTS as an embed request."""
    from pipelines.stagekit.dataset import load_prepared

    image = load_prepared(prepared).x("test")[0].reshape(-1).astype(float)
    return {
        CLASSIFY: json.dumps({"instances": [image.round(4).tolist()]}).encode(),
        EMBED: json.dumps({"texts": TEXTS}).encode(),
    }


def echo_answers(export_dir: str, encoder_dir: str, scratch: Path) -> dict[str, Path]:
    """What the echo servers answer: documents shaped and sized like dlpipe's answers (one
    prediction over the classifier's classes; one float32 embedding per text)."""
    import numpy as np
    import orjson

    from benchmarks.servers.response import predictions

    classifier = json.loads((Path(export_dir) / "model_card.json").read_text())
    encoder = json.loads((Path(encoder_dir) / "model_card.json").read_text())
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(len(classifier["class_names"])), 1).astype(np.float32)
    width = encoder["graphs"]["embed"]["shape"][-1]
    embeddings = rng.standard_normal((len(TEXTS), width)).astype(np.float32) / np.sqrt(width)
    documents = {
        CLASSIFY: {
            "model": classifier["name"],
            "version": "1",
            "predictions": predictions(classifier["class_names"], probabilities),
        },
        EMBED: {
            "model": encoder["name"],
            "version": "1",
            "embeddings": embeddings,
            "truncated": [False] * len(TEXTS),
        },
    }
    paths = {}
    for route, document in documents.items():
        paths[route] = scratch / f"echo{route.replace('/', '_')}.json"
        paths[route].write_bytes(orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY))
    return paths


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
        url = f"{base}{server.route}"
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
    parser.add_argument("--encoder", default="artifacts/mlm/export")
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    parser.add_argument(
        "--servers",
        default="dlpipe,noop,echo,echo_granian,bare,naive,ray_default,dlpipe_embed,noop_embed,"
        "echo_embed",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    wrk_path()
    bodies = request_bodies(args.data)
    wanted = args.servers.split(",")
    log_dir = Path(tempfile.mkdtemp(prefix="dlpipe-serving-logs-"))
    print(f"server logs and no-op models in {log_dir}", flush=True)
    answers = echo_answers(args.export, args.encoder, log_dir)
    listed = servers(args.export, args.model, args.encoder, log_dir, answers)
    unknown = set(wanted) - {server.name for server in listed}
    if unknown:
        raise SystemExit(f"--servers: unknown {', '.join(sorted(unknown))}")
    rounds: dict[str, list[dict[str, dict]]] = {}
    for round_number in range(1, args.rounds + 1):
        for server in listed:
            if server.name not in wanted:
                continue
            print(f"round {round_number}: {server.name}", flush=True)
            rounds.setdefault(server.name, []).append(
                measure(server, bodies[server.route], args.seconds, log_dir)
            )
    results: dict = {name: median_round(runs) for name, runs in rounds.items()}
    results["shares_at_32"] = shares_at_32(results)
    shares = "; ".join(
        f"{name} = {share:.0%} of {ceiling}"
        for name, by_ceiling in results["shares_at_32"].items()
        for ceiling, share in by_ceiling.items()
    )
    write_results(
        args.output,
        results,
        table({k: v for k, v in results.items() if k != "shares_at_32"}),
        f"wrk, {args.seconds:g} s per level, median of {args.rounds} rounds (requests/s min-max "
        f"beside it); /v1/classify: one 8x8 digit (64 features) per request; /v1/embed: "
        f"{len(TEXTS)} short texts per request. At 32 clients: {shares or 'no pair measured'}.",
    )


def shares_at_32(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """dlpipe's requests/s at 32 clients as a share of each of its ceilings measured."""
    return {
        server: {
            ceiling: round(results[server]["32"]["rps"] / results[ceiling]["32"]["rps"], 3)
            for ceiling in ceilings
            if ceiling in results and results[ceiling]["32"]["rps"] > 0
        }
        for server, ceilings in SHARES.items()
        if server in results
    }


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
