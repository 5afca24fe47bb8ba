"""The serving benchmark's summary of its rounds: the median run per level, not the best."""

from benchmarks.serving_throughput import median_round


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


def test_an_even_number_of_rounds_takes_the_lower_middle_run() -> None:
    assert median_round([run(5000, 12.0), run(3000, 30.0)])["32"]["rps"] == 3000
