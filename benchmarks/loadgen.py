"""Closed-loop HTTP load on loopback with wrk: N connections, each sending its next request
as soon as the last one is answered, so N is the number of concurrent clients.

wrk (C, event-driven) keeps the load generator from being what is measured: a Python client
on the same two cores would saturate before the faster servers do. Debian/Ubuntu:
`apt-get install wrk`; macOS: `brew install wrk`.

`ThreadedLoad` is the other kind: a few Python clients that record when and how each
failed request failed, for the fault runs (benchmarks/cluster.py, benchmarks/faults/).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

# wrk's Lua hook: every request is a POST of the same JSON body, read from a file.
POST_SCRIPT = """
local f = assert(io.open(os.getenv("DLPIPE_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
"""

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("wrk is needed for the serving benchmark: apt-get install wrk")
    return path


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS_MS[unit]


def parse_wrk(output: str) -> dict[str, float]:
    """requests/s, p50/p99 latency (ms) and errors (socket errors + non-2xx) from wrk --latency."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))
    errors = 0
    socket = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket:
        errors += sum(int(n) for n in socket.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    return {
        "rps": round(rps, 1),
        "p50_ms": round(p50, 2),
        "p99_ms": round(p99, 2),
        "errors": errors,
    }


def run_load(
    url: str,
    body: bytes,
    concurrency: int,
    seconds: float,
    threads: int = 1,
    pause_ms: float = 0.0,
) -> dict[str, float]:
    """`concurrency` clients POSTing `body` to `url` for `seconds`; wrk's figures. With
    `pause_ms`, each client waits that long before each request (a lighter, paced load)."""
    with tempfile.TemporaryDirectory(prefix="dlpipe-load-") as scratch:
        script = Path(scratch) / "post.lua"
        pace = f"function delay()\n  return {pause_ms:g}\nend\n" if pause_ms > 0 else ""
        script.write_text(POST_SCRIPT + pace)
        body_file = Path(scratch) / "body.json"
        body_file.write_bytes(body)
        result = subprocess.run(
            [
                wrk_path(),
                f"-t{min(threads, concurrency)}",
                f"-c{concurrency}",
                f"-d{seconds:g}s",
                "--timeout",
                "5s",
                "--latency",
                "-s",
                str(script),
                url,
            ],
            env={"DLPIPE_BODY_FILE": str(body_file)},
            capture_output=True,
            text=True,
            check=False,
        )
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed against {url}: {result.stdout}{result.stderr}")
    return parse_wrk(result.stdout)


FAILURE_BACKOFF_S = 0.1


class ThreadedLoad:
    """`clients` threads posting /v1/classify back to back from Python, each on its own
    keep-alive connection (re-opened after a failure, as a client library would), keeping
    the time and kind of every failure: for fault runs, where what fails matters more than
    the peak rate wrk measures."""

    def __init__(self, url: str, clients: int) -> None:
        self.url, self.clients = url, clients
        self.sent = 0
        self.failures: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self) -> None:
        import httpx

        body = {"instances": [[0.5] * 64]}
        # One client for the whole run: its pool drops a broken connection and opens a new
        # one. (A new httpx.Client per failure builds an SSL context each time: against a
        # port nothing listens on, that loop took a whole core, and the Ray worker starting
        # the replacement replica on this 2-CPU machine waited for it.)
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                failure = None
                try:
                    response = client.post("/v1/classify", json=body)
                    if response.status_code != 200:
                        failure = f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    failure = type(exc).__name__
                with self._lock:
                    self.sent += 1
                    if failure:
                        self.failures.append((time.time(), failure))
                # After a failure, back off as a client library's retry would.
                time.sleep(FAILURE_BACKOFF_S if failure else 0.01)
