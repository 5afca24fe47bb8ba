"""The latency sample the serving metrics hand to Ray: every request equally likely in it."""

from __future__ import annotations

import random

from serving.metrics import Reservoir


def test_below_its_size_the_reservoir_keeps_every_value_in_order():
    sample = Reservoir(128)
    for value in range(100):
        sample.add(float(value))
    assert sample.kept == [float(v) for v in range(100)] and sample.seen == 100


def test_beyond_its_size_every_value_is_equally_likely_to_be_kept():
    """10,000 values in 40 reservoirs of 128: each tenth of the stream holds a tenth of
    what was kept (within sampling noise), so the sample's quantiles are the stream's."""
    kept_per_tenth = [0] * 10
    for seed in range(40):
        sample = Reservoir(128, random.Random(seed))
        for value in range(10_000):
            sample.add(float(value))
        assert len(sample.kept) == 128 and sample.seen == 10_000
        for value in sample.kept:
            kept_per_tenth[int(value) // 1000] += 1
    expected = 40 * 128 / 10  # 512
    assert all(abs(count - expected) < 0.2 * expected for count in kept_per_tenth), kept_per_tenth
    # A late burst of slow requests is not drowned out: the median is the stream's.
    sample = Reservoir(128, random.Random(0))
    for value in range(10_000):
        sample.add(1.0 if value < 5_000 else 100.0)
    assert 0.35 < sum(v == 100.0 for v in sample.kept) / 128 < 0.65
