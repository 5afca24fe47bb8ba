"""Every endpoint of a running dlpipe app fuzzed, against its own OpenAPI document:

    make fuzz                                   # starts `dlpipe serve` on the exported models
    python -m benchmarks.fuzz --url http://127.0.0.1:8000 --examples 200   # a running app

1. Schemathesis (its coverage and fuzzing phases, every check) generates requests from
   /openapi.json, valid and invalid: wrong types, boundary sizes, missing and extra
   fields, wrong methods and content types. Its checks include "a schema-valid request
   was rejected" and "a schema-invalid request was accepted": the document must state
   what the server enforces (serving/kinds.py narrows it per loaded model), and the
   formats JSON Schema cannot check have generators (benchmarks/fuzzing/formats.py).
2. Hypothesis draws what the schema cannot describe (benchmarks/fuzzing/hostile.py).
3. The app must still be healthy afterwards.

Results: benchmarks/results/fuzz.json, `{"endpoints": {path: {"cases", "5xx", "4xx"}},
"healthy_after": bool, ...}`, and fuzz.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.fuzzing.hostile import CASES, run_case
from benchmarks.workspace import REPO

RESULTS = Path(__file__).parent / "results"
EXPORTS = {
    "--model": "artifacts/supervised/export",
    "--mlm-model": "artifacts/mlm/export",
    "--segment-model": "artifacts/segment/export",
}


def fuzz(url: str, examples: int, hostile_examples: int, seed: int = 1) -> dict[str, Any]:
    """Fuzz the app at `url` (see the module docstring); the report."""
    headers = _auth_headers()
    document = httpx.get(f"{url}/openapi.json", headers=headers, timeout=10).json()
    with tempfile.TemporaryDirectory(prefix="dlpipe-fuzz-") as scratch:
        run = _schemathesis(url, document, examples, seed, Path(scratch))
    endpoints: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for path, status in run["exchanges"]:
        endpoints[path]["cases"] += 1
        endpoints[path][f"{status // 100}xx"] += 1

    hostile = {}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:

        def post(path: str, body: bytes) -> tuple[int, str]:
            answer = client.post(path, content=body, headers={"content-type": "application/json"})
            return answer.status_code, answer.text

        for case in CASES:
            if case.path not in document["paths"]:
                continue  # that model is not served here
            outcome = run_case(case, post, hostile_examples)
            hostile[case.name] = outcome
            for key in ("cases", "5xx", "4xx", "2xx"):
                endpoints[case.path][key] += outcome[key]
    healthy = _healthy(url, headers)
    report = {
        "endpoints": {
            path: {"cases": c["cases"], "5xx": c["5xx"], "4xx": c["4xx"], "2xx": c["2xx"]}
            for path, c in sorted(endpoints.items())
        },
        "healthy_after": healthy,
        "schemathesis": run["summary"],
        "hostile": hostile,
    }
    posts = [p for p, spec in document["paths"].items() if "post" in spec]
    report["met"] = bool(
        healthy
        and all(c["5xx"] == 0 for c in report["endpoints"].values())
        and all(report["endpoints"].get(p, {}).get("cases", 0) >= examples for p in posts)
        and not run["summary"]["failures"]
        and all(not h["broken"] for h in hostile.values())
    )
    return report


def _schemathesis(
    url: str, document: dict[str, Any], examples: int, seed: int, scratch: Path
) -> dict[str, Any]:
    """Run the schemathesis CLI; every exchange (path, status) from its HAR log, and a
    summary of its JSON report."""
    tokens = [
        item["x-max-tokens"]
        for spec in document["paths"].values()
        for op in spec.values()
        for item in _text_items(op)
        if "x-max-tokens" in item
    ]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "benchmarks.fuzzing.formats",
        "PYTHONPATH": str(REPO),
        "DLPIPE_FUZZ_MAX_TOKENS": str(min(tokens, default=62)),
    }
    command = [
        str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/openapi.json",
        "--max-examples", str(examples), "--seed", str(seed), "--checks", "all",
        "--phases", "examples,coverage,fuzzing", "--report", "har,json",
        "--report-dir", str(scratch), "--no-color", "--request-timeout", "30",
        # The key, if any, on the command line: fuzz a test key, not a client's.
        *[arg for name, value in _auth_headers().items() for arg in ("-H", f"{name}: {value}")],
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        command, env=env, capture_output=True, text=True, cwd=scratch, check=False
    )
    reports = {kind: next(scratch.glob(f"{kind}-*.json"), None) for kind in ("har", "json")}
    if None in reports.values():  # it stopped before testing: a bad flag, no connection
        raise RuntimeError(f"schemathesis wrote no report:\n{result.stdout}{result.stderr}")
    har = json.loads(reports["har"].read_text())
    report = json.loads(reports["json"].read_text())
    exchanges = [
        (httpx.URL(entry["request"]["url"]).path, entry["response"]["status"])
        for entry in har["log"]["entries"]
    ]
    warnings = {kind: found for kind, found in report["warnings"].items() if found}
    return {
        "exchanges": exchanges,
        "summary": {
            "exit_code": result.returncode,
            "seconds": round(time.monotonic() - started, 1),
            "generated": report["test_cases"]["generated"],
            "failures": [_failure(f) for f in report["failures"]][:20],
            "errors": [str(e)[:300] for e in report["errors"]][:10],
            "warnings": warnings,
            "valid_rates": report.get("valid_rates", {}),
            **({} if result.returncode == 0 else {"output_tail": result.stdout[-3000:]}),
        },
    }


def _text_items(operation: dict[str, Any]) -> list[dict[str, Any]]:
    body = operation.get("requestBody", {}).get("content", {}).get("application/json", {})
    texts = body.get("schema", {}).get("properties", {}).get("texts", {})
    return [texts["items"]] if "items" in texts else []


def _failure(failure: Any) -> Any:
    """One failure of the JSON report, short."""
    if isinstance(failure, dict):
        keep = ("operation", "label", "title", "check", "name", "message", "status_code")
        short = {k: failure[k] for k in keep if k in failure}
        return short or str(failure)[:400]
    return str(failure)[:400]


def _healthy(url: str, headers: dict[str, str]) -> bool:
    """/healthz and /readyz answer 200, and so does /v1/models."""
    try:
        return all(
            httpx.get(f"{url}{path}", headers=headers, timeout=10).status_code == 200
            for path in ("/healthz", "/readyz", "/v1/models")
        )
    except httpx.HTTPError:
        return False


def _auth_headers() -> dict[str, str]:
    key = os.environ.get("DLPIPE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


@contextlib.contextmanager
def served(port: int) -> Iterator[str]:
    """`dlpipe serve` on the repository's exported models (what `make demo` or
    `dvc repro` leaves), as a user starts it; stopped with Ctrl-C (SIGINT) afterwards."""
    missing = [path for path in EXPORTS.values() if not (REPO / path).is_dir()]
    if missing:
        raise SystemExit(
            f"no exported model at {', '.join(missing)}: run `make demo` (or dvc repro) "
            "first, or fuzz a running app with --url"
        )
    dlpipe = str(Path(sys.executable).with_name("dlpipe"))
    command = [dlpipe, "serve", "--port", str(port)]
    for option, path in EXPORTS.items():
        command += [option, str(REPO / path)]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not _healthy(url, _auth_headers()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("dlpipe serve did not come up (see its output above)")
            time.sleep(1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def markdown(report: dict[str, Any]) -> str:
    lines = ["| endpoint | cases | 2xx | 4xx | 5xx |", "|---|---|---|---|---|"]
    for path, c in report["endpoints"].items():
        lines.append(f"| {path} | {c['cases']:,} | {c['2xx']:,} | {c['4xx']:,} | {c['5xx']} |")
    run = report["schemathesis"]
    lines += [
        "",
        f"Schemathesis: {run['generated']:,} generated cases, {len(run['failures'])} failures "
        f"(every check, including schema-valid requests rejected and schema-invalid "
        f"accepted), warnings: {', '.join(run['warnings']) or 'none'}. Healthy after: "
        f"{'yes' if report['healthy_after'] else 'NO'}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running app (default: start dlpipe serve)")
    parser.add_argument("--port", type=int, default=8011, help="for the started app")
    parser.add_argument("--examples", type=int, default=1000, help="per endpoint and phase")
    parser.add_argument("--hostile-examples", type=int, default=300, help="per hostile kind")
    parser.add_argument("--output", type=Path, default=RESULTS / "fuzz.json")
    args = parser.parse_args(argv)
    with contextlib.nullcontext(args.url) if args.url else served(args.port) as url:
        report = fuzz(url.rstrip("/"), args.examples, args.hostile_examples)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    if not report["met"]:
        raise SystemExit("fuzzing found problems: see " + str(args.output))


if __name__ == "__main__":
    main()
