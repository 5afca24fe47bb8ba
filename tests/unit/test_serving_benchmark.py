"""The serving benchmark's summary of its rounds: the median run per level, not the best;
the request-path benchmark's in-process app; the lifecycle benchmark's interval."""

import asyncio

import pytest

from benchmarks.lifecycle import median_interval
from benchmarks.request_path import build_app, drive
from benchmarks.serving_throughput import median_round
from tests.unit.test_predictor import export_dir  # noqa: F401 (a fixture: the tiny export)


def run(rps_at_32: float, p99_at_32: float, errors: int = 0) -> dict[str, dict]:
    return {"32": {"rps": rps_at_32, "p50_ms": 5.0, "p99_ms": p99_at_32, "errors": errors}}


def test_median_round_keeps_the_median_runs_figures_and_the_spread() -> None:
    merged = median_round([run(5000, 12.0), run(3000, 30.0, errors=2), run(4000, 15.0)])
    assert merged["32"] == {
        "rps": 4000,
        "p50_ms": 5.0,
        "p99_ms": 15.0,  # the latency measured in the same run as the median requests/s
        "errors": 2,  # every round's errors count
        "rps_min": 3000,
        "rps_max": 5000,
    }


@pytest.mark.parametrize(("n", "ranks"), [(6, (1, 6)), (7, (1, 7)), (15, (4, 12)), (30, (10, 21))])
def test_the_medians_interval_is_the_binomial_order_statistics(n, ranks) -> None:
    # Ranks from the binomial tables for 95% (n=15: the 4th and 12th of 15 values).
    shuffled = [float(v) for v in range(n, 0, -1)]
    assert median_interval(shuffled) == (float(ranks[0]), float(ranks[1]))


def test_an_even_number_of_rounds_takes_the_lower_middle_run() -> None:
    assert median_round([run(5000, 12.0), run(3000, 30.0)])["32"]["rps"] == 3000


def test_the_request_path_app_answers_every_request_and_counts_its_cpu(export_dir) -> None:  # noqa: F811
    app = build_app(str(export_dir), watched=False)
    good = b'{"instances": [' + b",".join([b"[" + b",".join([b"0.5"] * 16) + b"]"]) + b"]}"
    seconds = asyncio.run(drive(app, good, clients=4, requests=5))
    assert 0 < seconds < 1
    assert app.models.get("classifier") is not None
    # A failing request is not timed as if it were answered.
    with pytest.raises(RuntimeError, match="HTTP 422"):
        asyncio.run(drive(app, b'{"instances": [[0.5]]}', clients=1, requests=1))


def test_the_request_path_app_with_capture_keeps_every_request(export_dir, tmp_path) -> None:  # noqa: F811
    from serving.capture import CaptureConfig

    app = build_app(str(export_dir), False, CaptureConfig(rate=1.0, directory=str(tmp_path)))
    good = b'{"instances": [' + b",".join([b"[" + b",".join([b"0.5"] * 16) + b"]"]) + b"]}"
    asyncio.run(drive(app, good, clients=4, requests=5))
    assert app.capture.backlog == 0  # drive waits for the writer: its CPU is the app's
    app.capture.close()
    lines = [line for f in tmp_path.glob("*.jsonl") for line in f.read_bytes().splitlines()]
    assert app.capture.captured == app.capture.written == len(lines) == 20
