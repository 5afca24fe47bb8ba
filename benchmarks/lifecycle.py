"""The model's life after deploy, measured on `dlpipe serve` (one replica, as the serving
benchmark holds it): what a canary and shadow mode cost and how exactly they split.

- `shadow_p50_overhead`: the champion's p50 latency at 32 closed-loop clients (wrk,
  `--seconds` each) with the challenger in shadow mode (every request copied), against the
  same app with the challenger off, as a fraction (0.2: 20% slower); the median of
  `--rounds` pairs, each pair's own ratio, in reverse order every other round, with a 95%
  interval for that median (`shadow_p50_overhead_interval`: order statistics, no
  assumption on the pairs' spread, which on a shared 2-CPU machine is the machine's
  speed from one run to the next more than the copies' cost); the copies
  take at most `--shadow-budget` of the replica's time (the app's default 0.05), so under
  this load a share of the requests is compared (`shadow_copied_share`, per run);
  `shadow_sampled_p50_overhead` the same with `--sample` (0.25) of the requests copied;
- `shadow_cpu_overhead`: the same pairs' replica CPU time per request (`/proc`), shadow
  against off: the cost itself, which the machine's other tenants move far less than p50;
- `canary_share_error`: the share of `--canary-requests` (5,000) answered by the challenger
  at `--share` 0.05, less 0.05;
- `failed_requests`: answers other than 200 over every phase: the wrk runs, the canary's
  requests, and a steady background load while the mode changes (off -> canary -> shadow
  -> off);
- `drift_p50_overhead`, `drift_rps_cost`: what watching drift costs the champion at 32
  clients (challenger off), against the same run with drift watching off, each round's
  pair; the median; `drift_cpu_overhead` the same pairs' CPU per request;
- `false_alarms`: drift alarms raised by `--drift-requests` (5,000) held-out test digits,
  one per request, from a fresh window (`false_alarm_rate`: per alarm check);
- `drift_delay_requests`: requests of a shifted stream (inverted digits; noisy digits,
  Gaussian noise of 0.3; customers' spend times 3 on the segmenter) until the alarm, after
  a window of held-out ones; the largest of the shifts (each under `drift_delays`).

The champion is `models:/dlpipe-classifier@champion`, the challenger by default the
semi-supervised student `models:/dlpipe-pseudolabel-classifier@champion` (a different
model of the same inputs): run from a checkout where `dvc repro` has registered both.

    python -m benchmarks.lifecycle     # writes benchmarks/results/lifecycle.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import mlflow

from benchmarks.loadgen import run_load, wrk_path
from benchmarks.scratch import machine, markdown_table, write_results
from benchmarks.serving_throughput import CLASSIFY, Server, dlpipe_serve, request_bodies, running
from serving.lifecycle import ChallengerConfig

RESULTS = Path("benchmarks/results/lifecycle.json")
PORT = 8120
SLOT = "classifier"
TARGET_SHARE_ERROR = 0.02
TARGET_SHADOW_OVERHEAD = 0.20


class Background:
    """A steady trickle of requests on its own thread, counting answers other than 200."""

    def __init__(self, url: str, body: dict, rate: float = 50.0) -> None:
        self.url, self.body, self.interval = url, body, 1 / rate
        self.sent = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self._stop.is_set():
                try:
                    ok = client.post(CLASSIFY, json=self.body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.sent += 1
                self.failed += not ok
                time.sleep(self.interval)


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of what `values` sample: the order
    statistics x(k) and x(n+1-k) for the largest k with P(Binomial(n, 1/2) < k) at most
    half of 1 - `confidence` (the whole range below six values at 95%)."""
    ordered = sorted(values)
    n = len(ordered)
    k, below = 0, 0.0
    while k < n // 2:
        below += math.comb(n, k) / 2**n  # P(Binomial(n, 1/2) <= k)
        if below > (1 - confidence) / 2:
            break
        k += 1
    k = max(k, 1)
    return ordered[k - 1], ordered[n - k]


def replica_cpu_s() -> float:
    """CPU seconds (user + system) the app's Serve replicas have used so far, from /proc
    (Linux): a run's cost per request that other tenants' load on the machine barely moves,
    where its p50 moves by a third."""
    total = 0
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"ServeReplica:dlpipe" not in cmdline.read_bytes():
                continue
            # Fields after the command's closing parenthesis: state is field 3, utime 14.
            fields = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a process that ended meanwhile
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def measured(url: str, body: bytes, seconds: float) -> dict[str, float]:
    """wrk at 32 clients for `seconds`, with the replica's CPU microseconds per request."""
    before = replica_cpu_s()
    result = run_load(url, body, 32, seconds)
    answered = max(result["rps"] * seconds, 1.0)
    return {**result, "cpu_us": round((replica_cpu_s() - before) / answered * 1e6, 1)}


def models_of(url: str, body: dict, count: int, connections: int = 4) -> list[str | None]:
    """`count` requests from `connections` clients: the model that gave each answer,
    `NAME/VERSION` (None: failed)."""
    answers: list[str | None] = []

    def run(share: int) -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            for _ in range(share):
                response = client.post(CLASSIFY, json=body)
                answer = response.json() if response.status_code == 200 else None
                answers.append(f"{answer['model']}/{answer['version']}" if answer else None)

    threads = [
        threading.Thread(target=run, args=(count // connections,)) for _ in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def send_each(base: str, route: str, bodies: list[dict], connections: int = 4) -> int:
    """POST every body of `bodies` once, from `connections` clients; returns the failures."""
    failed = [0] * connections

    def run(client_number: int) -> None:
        with httpx.Client(base_url=base, timeout=10) as client:
            for body in bodies[client_number::connections]:
                failed[client_number] += client.post(route, json=body).status_code != 200

    threads = [threading.Thread(target=run, args=(n,)) for n in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(failed)


def drift_of(base: str, slot: str) -> dict:
    """The slot's drift as /v1/models shows it."""
    listing = httpx.get(f"{base}/v1/models", timeout=10).json()
    return next(m["drift"] for m in listing["models"] if m["slot"] == slot)


def shadow_counts(base: str, slot: str) -> tuple[int, int]:
    """(requests compared, requests not copied: over the time budget or the queue full)
    of the slot's shadow figures now, as the replica that answers /v1/models has them (the
    benchmark serves one replica)."""
    listing = httpx.get(f"{base}/v1/models", timeout=10).json()
    entry = next(m for m in listing["models"] if m["slot"] == slot)
    shadow = (entry.get("challenger") or {}).get("shadow") or {}
    return shadow.get("requests", 0), shadow.get("over_budget", 0) + shadow.get("skipped", 0)


def fresh_drift(dashboard: str, base: str, settings: dict, app_name: str = "dlpipe") -> None:
    """Empty every replica's drift windows: watching off, then on with `settings`."""
    from serving.deploy import set_drift, wait_for_drift

    for enabled in (False, True):
        change = {**settings, "enabled": enabled}
        set_drift(dashboard, change, app_name)
        wait_for_drift(base, change)


def drift_trial(
    dashboard: str,
    base: str,
    slot: str,
    route: str,
    held_out: list[dict],
    shifts: dict[str, list[dict]],
    window: int = 1000,
    app_name: str = "dlpipe",
) -> dict:
    """Alarms over the `held_out` stream from a fresh window, then for each shift (from a
    fresh window filled with held-out inputs) the requests until the alarm (None: none
    within the shift's stream). Each body holds one input."""
    settings = {"window": window, "psi_alarm": 0.25, "check_every": 10}
    fresh_drift(dashboard, base, settings, app_name)
    failed = send_each(base, route, held_out)
    calm = drift_of(base, slot)
    checks = max((calm["seen"] - window) // settings["check_every"] + 1, 0)
    delays = {}
    for name, bodies in shifts.items():
        fresh_drift(dashboard, base, settings, app_name)
        failed += send_each(base, route, held_out[:window])
        before = drift_of(base, slot)["seen"]
        failed += send_each(base, route, bodies)
        state = drift_of(base, slot)
        delays[name] = state["alarm_at"] - before if state["alarm_at"] is not None else None
    return {
        "false_alarms": calm["alarms"],
        "alarm_checks": checks,
        "held_out_requests": len(held_out),
        "held_out_max_psi": calm["max_psi"],
        "delays": delays,
        "failed": failed,
    }


def digit_streams(
    prepared: str, requests: int, shifted: int = 1000, seed: int = 0
) -> tuple[list[dict], dict[str, list[dict]]]:
    """`requests` held-out test digits drawn at random (one per request), and `shifted`
    inverted and noisy ones."""
    import numpy as np

    from pipelines.stagekit.dataset import load_prepared

    images = load_prepared(prepared).x("test")
    images = images.reshape(len(images), -1).astype(np.float64)
    rng = np.random.default_rng(seed)
    held_out = images[rng.integers(len(images), size=requests)]
    pick = images[rng.integers(len(images), size=shifted)]
    noisy = np.clip(pick + rng.normal(0.0, 0.3, pick.shape), 0.0, 1.0)

    def bodies(rows: np.ndarray) -> list[dict]:
        return [{"instances": [row.round(4).tolist()]} for row in rows]

    return bodies(held_out), {"inverted": bodies(1.0 - pick), "noisy": bodies(noisy)}


def customer_streams(
    columns: list[str], requests: int, shifted: int = 1000, scale: float = 3.0, seed: int = 0
) -> tuple[list[dict], dict[str, list[dict]]]:
    """Customers of the CDNOW table the segmenter was fitted on (its `columns`), drawn at
    random, and `shifted` with their spend (the monetary columns) times `scale`."""
    import numpy as np

    from pipelines.unsupervised.segment_model import feature_table

    table = feature_table("data/raw/customers")[columns]
    rng = np.random.default_rng(seed)
    held_out = table.iloc[rng.integers(len(table), size=requests)]
    pick = table.iloc[rng.integers(len(table), size=shifted)].copy()
    for column in [c for c in table.columns if c.startswith("monetary")]:
        pick[column] = pick[column] * scale

    def bodies(rows) -> list[dict]:
        return [
            {"customers": [{k: float(v) for k, v in row.items()}]} for _, row in rows.iterrows()
        ]

    return bodies(held_out), {"scaled_spend": bodies(pick)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--champion", default="models:/dlpipe-classifier@champion")
    parser.add_argument("--challenger", default="models:/dlpipe-pseudolabel-classifier@champion")
    parser.add_argument("--data", default="data/prepared/supervised")
    # Many short rounds rather than a few long ones: two runs next to each other share
    # more of the machine's speed, and the median's interval narrows with the pairs.
    parser.add_argument("--seconds", type=float, default=3.0, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=15, help="rounds of four runs")
    parser.add_argument("--share", type=float, default=0.05)
    parser.add_argument("--sample", type=float, default=0.25, help="a sampled shadow's share")
    parser.add_argument(
        "--shadow-budget",
        type=float,
        help="shadow: the most of the replica's time the copies take (default: the app's, "
        f"{ChallengerConfig.shadow_budget})",
    )
    parser.add_argument("--canary-requests", type=int, default=5000)
    parser.add_argument("--segmenter", default="models:/dlpipe-segment@champion")
    parser.add_argument("--drift-requests", type=int, default=5000)
    parser.add_argument("--dashboard", default="http://127.0.0.1:8265", help="the app's Ray's")
    parser.add_argument(
        "--loaded-off",
        action="store_true",
        help="the off runs keep the challenger loaded (mode off) instead of unloading it: "
        "whether shadow's cost is the copies or the second model's presence",
    )
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    wrk_path()
    from pipelines.stagekit.tracking import tracking_uri
    from serving.promotion import set_challenger, wait_for_challenger

    mlflow.set_tracking_uri(tracking_uri())  # the registry the app serves from
    dashboard = args.dashboard
    raw_body = request_bodies(args.data)[CLASSIFY]
    body = json.loads(raw_body)
    command = dlpipe_serve(PORT, args.champion, segmenter=args.segmenter)
    server = Server("dlpipe", command, PORT, {"RAY_ADDRESS": "local"})
    log_dir = Path(tempfile.mkdtemp(prefix="dlpipe-lifecycle-logs-"))
    print(f"server log in {log_dir}", flush=True)
    failed = 0
    with running(server, log_dir) as base:
        url = f"{base}{CLASSIFY}"

        def settle() -> None:
            # /v1/models shows a new setting before the replica's reconfigure is done: it
            # still loads (drift references: the encoder's is 400 kB of JSON) and then
            # collects the heap (serving/app.py freeze_heap, ~0.1 s holding the GIL). A
            # measured run starting then paid that in its p99 and throughput.
            run_load(url, raw_body, 8, 2)

        def challenger(mode: str, **settings) -> None:
            source = args.challenger if mode != "off" or args.loaded_off else None
            if mode == "shadow" and args.shadow_budget is not None:
                settings["shadow_budget"] = args.shadow_budget
            config = set_challenger(dashboard, SLOT, {"mode": mode, **settings}, source)
            wait_for_challenger(base, SLOT, config)
            settle()

        def drift(settings: dict) -> None:
            from serving.deploy import set_drift, wait_for_drift

            set_drift(dashboard, settings)
            wait_for_drift(base, settings)
            settle()

        run_load(url, raw_body, 8, 3)  # warm-up
        with Background(base, body) as background:
            challenger("canary", share=args.share)
            versions = models_of(base, body, args.canary_requests)
            challenger("shadow", shadow_share=1.0)
            challenger("off")
        failed += background.failed + versions.count(None)
        challenger_model = _pinned(args.challenger)
        observed = versions.count(challenger_model) / len(versions)
        # Each round's four runs: (challenger's shadow share or None for off, drift watched).
        # Next to each other, the pairs compared (blind/off, off/shadow, off/sample), in
        # reverse order every other round, so that a drift of the machine over a round
        # does not favour the run that always came first.
        steps = {
            "blind": (None, False),
            "off": (None, True),
            "shadow": (1.0, True),
            "sample": (args.sample, True),
        }
        state: list[object] = [object(), object()]  # as set now: (shadow share, watched)

        def arrange(share: float | None, watched: bool) -> None:
            if watched != state[1]:
                drift({"enabled": watched})
            if share != state[0]:
                challenger("off") if share is None else challenger("shadow", shadow_share=share)
            state[:] = [share, watched]

        pairs, sampled, unwatched = [], [], []
        for round_number in range(1, args.rounds + 1):
            runs, started = {}, time.monotonic()
            order = list(steps) if round_number % 2 else list(reversed(steps))
            for name in order:
                arrange(*steps[name])
                before = shadow_counts(base, SLOT)
                runs[name] = measured(url, raw_body, args.seconds)
                after = shadow_counts(base, SLOT)
                if steps[name][0] is not None:  # the share of requests compared in the run
                    compared, passed = (b - a for a, b in zip(before, after, strict=True))
                    runs[name]["copied"] = round(compared / max(compared + passed, 1), 3)
                failed += int(runs[name]["errors"])
            unwatched.append((runs["blind"], runs["off"]))
            pairs.append((runs["off"], runs["shadow"]))
            sampled.append((runs["off"], runs["sample"]))
            took = time.monotonic() - started
            print(f"round {round_number} ({', '.join(order)}, {took:.0f} s): {runs}", flush=True)
        drift({"enabled": True})
        challenger("off")
        digits = drift_trial(
            dashboard, base, SLOT, CLASSIFY, *digit_streams(args.data, args.drift_requests)
        )
        listing = httpx.get(f"{base}/v1/models", timeout=10).json()
        columns = next(m for m in listing["models"] if m["slot"] == "segmenter")["input"]
        customers = drift_trial(
            dashboard,
            base,
            "segmenter",
            "/v1/segment",
            *customer_streams(columns["feature_names"], args.drift_requests),
        )
        failed += digits["failed"] + customers["failed"]
        print(f"drift: digits {digits}, customers {customers}", flush=True)
    delays = {
        **{f"digits_{k}": v for k, v in digits["delays"].items()},
        **{f"customers_{k}": v for k, v in customers["delays"].items()},
    }
    delay = None if None in delays.values() else max(delays.values())
    false_alarms = digits["false_alarms"] + customers["false_alarms"]
    checks = digits["alarm_checks"] + customers["alarm_checks"]
    overheads = [s["p50_ms"] / o["p50_ms"] - 1 for o, s in pairs]
    overhead = statistics.median(overheads)
    interval = median_interval(overheads)
    sampled_overheads = [s["p50_ms"] / o["p50_ms"] - 1 for o, s in sampled]
    sampled_overhead = statistics.median(sampled_overheads)
    sampled_interval = median_interval(sampled_overheads)
    shadow_cpu = statistics.median(s["cpu_us"] / o["cpu_us"] - 1 for o, s in pairs)
    drift_cpu = statistics.median(w["cpu_us"] / b["cpu_us"] - 1 for b, w in unwatched)
    drift_overheads = [w["p50_ms"] / b["p50_ms"] - 1 for b, w in unwatched]
    drift_costs = [1 - w["rps"] / b["rps"] for b, w in unwatched]
    figures = {
        "canary_share_error": round(observed - args.share, 4),
        "canary_share_configured": args.share,
        "canary_share_observed": round(observed, 4),
        "canary_requests": len(versions),
        "failed_requests": failed,
        "background_requests": background.sent,
        "shadow_p50_overhead": round(overhead, 3),
        "shadow_p50_overheads": [round(x, 3) for x in overheads],
        "shadow_p50_overhead_interval": [round(x, 3) for x in interval],
        "shadow_cpu_overhead": round(shadow_cpu, 3),
        "off_cpu_us_per_request": [o["cpu_us"] for o, _ in pairs],
        "shadow_cpu_us_per_request": [s["cpu_us"] for _, s in pairs],
        "shadow_budget": args.shadow_budget or ChallengerConfig.shadow_budget,
        "shadow_copied_share": [s["copied"] for _, s in pairs],
        "shadow_sampled_share": args.sample,
        "shadow_sampled_p50_overhead": round(sampled_overhead, 3),
        "shadow_sampled_p50_overhead_interval": [round(x, 3) for x in sampled_interval],
        "off_p50_ms": [o["p50_ms"] for o, _ in pairs],
        "shadow_p50_ms": [s["p50_ms"] for _, s in pairs],
        "off_rps": [o["rps"] for o, _ in pairs],
        "shadow_rps": [s["rps"] for _, s in pairs],
        "shadow_sampled_p50_ms": [s["p50_ms"] for _, s in sampled],
        "drift_p50_overhead": round(statistics.median(drift_overheads), 3),
        "drift_rps_cost": round(statistics.median(drift_costs), 3),
        "drift_off_rps": [b["rps"] for b, _ in unwatched],
        "drift_cpu_overhead": round(drift_cpu, 3),
        "drift_off_cpu_us_per_request": [b["cpu_us"] for b, _ in unwatched],
        "drift_delay_requests": delay,
        "drift_delays": delays,
        "false_alarms": false_alarms,
        "false_alarm_rate": round(false_alarms / max(checks, 1), 5),
        "drift_alarm_checks": checks,
        "drift_held_out_requests": digits["held_out_requests"] + customers["held_out_requests"],
        "drift_held_out_max_psi": {
            "digits": round(digits["held_out_max_psi"], 4),
            "customers": round(customers["held_out_max_psi"], 4),
        },
        "champion": args.champion,
        "challenger": f"{args.challenger} ({challenger_model})",
        "machine": machine(),
    }
    rows = [
        (
            "canary share error",
            f"{figures['canary_share_error']:+.4f}",
            f"within +-{TARGET_SHARE_ERROR}",
            "met" if abs(figures["canary_share_error"]) <= TARGET_SHARE_ERROR else "**MISSED**",
        ),
        ("failed requests", failed, "0", "met" if failed == 0 else "**MISSED**"),
        (
            "shadow p50 overhead at 32 clients (95% interval of the median)",
            f"{overhead:+.1%} ({interval[0]:+.1%} .. {interval[1]:+.1%})",
            f"<= {TARGET_SHADOW_OVERHEAD:.0%}",
            "met" if overhead <= TARGET_SHADOW_OVERHEAD else "**MISSED**",
        ),
        (
            "shadow: the replica's CPU per request",
            f"{shadow_cpu:+.1%}",
            "measured",
            "",
        ),
        (
            f"shadow: requests compared (budget {figures['shadow_budget']:g} of the time)",
            f"{statistics.median(figures['shadow_copied_share']):.0%}",
            "measured",
            "",
        ),
        (
            f"shadow p50 overhead, {args.sample:g} of requests copied",
            f"{sampled_overhead:+.1%} ({sampled_interval[0]:+.1%} .. {sampled_interval[1]:+.1%})",
            f"<= {TARGET_SHADOW_OVERHEAD:.0%}",
            "met" if sampled_overhead <= TARGET_SHADOW_OVERHEAD else "**MISSED**",
        ),
        (
            "drift watching: p50 overhead at 32 clients (rps lost; CPU per request)",
            f"{figures['drift_p50_overhead']:+.1%} ({figures['drift_rps_cost']:.1%}; "
            f"{drift_cpu:+.1%})",
            "measured",
            "",
        ),
        (
            "drift delay (requests), worst shift",
            delay if delay is not None else "no alarm",
            "<= 500",
            "met" if delay is not None and delay <= 500 else "**MISSED**",
        ),
        (
            f"false alarms over {figures['drift_held_out_requests']:,} held-out requests",
            false_alarms,
            "0",
            "met" if false_alarms == 0 else "**MISSED**",
        ),
    ]
    write_results(
        args.output,
        figures,
        markdown_table(("figure", "value", "target", "verdict"), rows),
        f"dlpipe serve, one replica; wrk {args.seconds:g} s at 32 clients per run, "
        f"{args.rounds} off/shadow pairs (median of the pairs' ratios); canary over "
        f"{len(versions)} requests from 4 clients; a 50/s background load across the mode "
        "changes; drift: window 1,000, alarm at PSI 0.25, checked every 10 inputs, "
        f"{args.drift_requests:,} held-out digits and customers each, shifts of 1,000.",
    )


def _pinned(source: str) -> str:
    """NAME/VERSION of a registry URI, as `models_of` names answers."""
    from pipelines.stagekit.tracking import tracking_uri
    from serving.promotion import pin

    return pin(source, tracking_uri()).removeprefix("models:/")


if __name__ == "__main__":
    main()
