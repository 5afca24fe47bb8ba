"""The inference benchmark's timer, on a fake clock: medians, not means, and fair turns."""

import itertools

import pytest

from benchmarks.inference import median_ms


class FakeClock:
    """Time moves only when a timed call runs: each call takes its next listed duration."""

    def __init__(self) -> None:
        self.now = 0.0
        self.runs: dict[str, int] = {}
        self.spent: dict[str, float] = {}

    def __call__(self) -> float:
        return self.now

    def call(self, name: str, durations: list[float]):
        steps = itertools.cycle(durations)
        self.runs[name], self.spent[name] = 0, 0.0

        def run() -> None:
            step = next(steps)
            self.runs[name] += 1
            self.spent[name] += step
            self.now += step

        return run


def test_median_ms_is_the_median_of_each_calls_runs_in_turns():
    clock = FakeClock()
    # One run in five is a 50 ms outlier: the means would be 11.6 and 13.2 ms.
    calls = {
        "fast": clock.call("fast", [0.002] * 4 + [0.05]),
        "slow": clock.call("slow", [0.004] * 4 + [0.05]),
    }
    seconds, warmup_s, slices, outlier_s = 1.0, 0.1, 5, 0.05
    ms = median_ms(calls, seconds=seconds, warmup_s=warmup_s, slices=slices, clock=clock)
    assert ms == pytest.approx({"fast": 2.0, "slow": 4.0})
    # Each call gets its share of the clock, `seconds` plus its warm-up, however fast it
    # is; the warm-up and each slice may overrun by at most one run (an outlier here).
    budget = seconds + warmup_s
    for name in calls:
        assert budget <= clock.spent[name] <= budget + (slices + 1) * outlier_s


def test_median_ms_runs_a_slow_call_min_runs_times():
    clock = FakeClock()
    slow = clock.call("slow", [1.0])
    assert median_ms({"slow": slow}, 0.5, warmup_s=0.0, min_runs=10, clock=clock) == {
        "slow": 1000.0
    }
    assert clock.runs["slow"] == 10  # 5 slices of 2 runs; no warm-up asked for


def test_the_demo_timing_reads_stages_side_by_side_each_to_its_own_last_line(tmp_path):
    # `dlpipe run --jobs`: a stage's lines start with its name, and the next stage to start
    # is another chain's, not the end of this one.
    import sys

    from benchmarks.pipeline_overhead import timed_phases

    script = (
        "import sys, time\n"
        "def say(line):\n"
        "    print(line, flush=True)\n"
        "say('PATH=x /v/bin/dlpipe run --jobs 2')\n"
        "say(\"a | Running stage 'a':\"); time.sleep(0.4)\n"
        "say(\"b | Running stage 'b':\"); time.sleep(0.4)\n"
        "say('a | a ends'); time.sleep(0.8)\n"
        "say('b | b ends')\n"
    )
    phases = timed_phases([sys.executable, "-c", script], tmp_path, {"PATH": "/usr/bin"})
    stages = phases.steps[0]["stages"]
    # a to its own last line (0.8 s), not to b's (1.2 s): a busy machine only adds to both.
    assert stages["a"] >= 0.7 and stages["b"] - stages["a"] >= 0.3, stages
