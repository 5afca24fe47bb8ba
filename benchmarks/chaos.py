"""Faults injected into the real components, each measured against its target:

    make chaos                                   # every fault; minutes to tens of minutes
    python -m benchmarks.chaos --only prepared_array_altered --output /tmp/chaos.json

Each fault runs in a throwaway copy of the repository (benchmarks/workspace.py) whose
stages join one local Ray cluster started here; nothing of the checkout is touched. The
results go to benchmarks/results/chaos.json, `{"faults": {name: {"met": bool, "target":
..., measured figures}}}`, and a table in chaos.md. The faults themselves live in
benchmarks/faults/, one module per component.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.faults import data, drivers, serving, soak, tracking
from benchmarks.workspace import Workspace, copy_repository

RESULTS = Path(__file__).parent / "results"


def small_pipeline(params: dict[str, Any]) -> None:
    """Settings that keep each fault to minutes on 2 CPUs (the same code paths)."""
    params["train"].update(early_stopping_patience=100)  # every epoch runs: a fixed length
    params["mlm"].update(vocab_size=500)
    params["mlm"]["model"].update(layers=1, width=32, heads=2, ffn_width=64)
    params["mlm"]["train"].update(early_stopping_patience=100, warmup_epochs=0)


FAULTS: dict[str, Callable[[Workspace], dict[str, Any]]] = {
    "train_driver_killed": lambda ws: drivers.driver_killed(
        ws, drivers.SUPERVISED, epochs=8, kill_after=3
    ),
    "mlm_driver_killed": lambda ws: drivers.driver_killed(ws, drivers.MLM, epochs=6, kill_after=2),
    "tune_driver_killed": drivers.tune_driver_killed,
    "tracking_server_down": lambda ws: tracking.server_down(
        ws, epochs=8, back_epochs=60, down_after=2
    ),
    "serve_replica_killed": lambda ws: serving.replica_killed(ws, train_epochs=8),
    "serve_graceful_operations": lambda ws: serving.graceful_operations(ws, train_epochs=8),
    "serve_soak": lambda ws: soak.soak(ws, train_epochs=8),
    "prepared_array_altered": data.prepared_array_altered,
    "stage_killed_mid_write": data.stage_killed_mid_write,
    "output_dir_full": data.output_dir_full,
}


def run_faults(names: list[str], root: Path) -> dict[str, Any]:
    """Run the named faults (in FAULTS order) in one workspace under `root`; a fault that
    raises is recorded as not met, with the error, and the others still run."""
    import ray

    context = ray.init(num_cpus=2, include_dashboard=True, logging_level="WARNING")
    try:
        ws = copy_repository(root / "repo", context.address_info["gcs_address"])
        ws.env["RAY_DASHBOARD_ADDRESS"] = f"http://{context.dashboard_url}"
        ws.edit_params(small_pipeline)
        results: dict[str, Any] = {}
        for name in (n for n in FAULTS if n in names):
            print(f"fault {name} ...", flush=True)
            started = time.monotonic()
            try:
                outcome = FAULTS[name](ws)
            except Exception as exc:  # a harness or product failure: reported, not hidden
                outcome = {"met": False, "error": f"{type(exc).__name__}: {exc}"[-2000:]}
            outcome["seconds"] = round(time.monotonic() - started, 1)
            results[name] = outcome
            print(f"  {'met' if outcome['met'] else 'NOT MET'}: {_summary(outcome)}", flush=True)
        return results
    finally:
        ray.shutdown()


def _summary(outcome: dict[str, Any]) -> str:
    skip = {"met", "target"}
    text = ", ".join(f"{k}={v}" for k, v in outcome.items() if k not in skip)
    return " ".join(text.split())[:400]  # one line: it is a table cell too


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| fault | met | target | measured |",
        "|---|---|---|---|",
    ]
    for name, outcome in report["faults"].items():
        measured = _summary(outcome).replace("|", "/")
        target = outcome.get("target", "")
        lines.append(f"| {name} | {'yes' if outcome['met'] else 'NO'} | {target} | {measured} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(FAULTS), help="repeatable")
    parser.add_argument("--output", type=Path, default=RESULTS / "chaos.json")
    args = parser.parse_args(argv)
    names = args.only or list(FAULTS)
    with tempfile.TemporaryDirectory(prefix="dlpipe-chaos-") as root:
        faults = run_faults(names, Path(root))
    report = {"machine": f"{platform.node()} ({platform.processor() or platform.machine()})"}
    if args.output.exists() and args.only:  # a partial run updates its faults only
        report["faults"] = json.loads(args.output.read_text()).get("faults", {})
    report.setdefault("faults", {}).update(faults)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    missed = [name for name, outcome in faults.items() if not outcome["met"]]
    if missed:
        raise SystemExit(f"not met: {', '.join(missed)}")


if __name__ == "__main__":
    main()
