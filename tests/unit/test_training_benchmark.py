"""The training benchmark's arithmetic: steady-state rate, start-up, data wait, the target."""

import pytest

from benchmarks.training_throughput import epoch_figures, steady_epochs, summary, table


def epoch(seconds, train, wait):
    return {"epoch_seconds": seconds, "train_seconds": train, "data_wait_seconds": wait}


def test_figures_leave_out_the_warm_up_epoch_and_count_what_happens_between_epochs():
    history = [epoch(9.0, 8.0, 0.5), epoch(3.0, 2.5, 0.1), epoch(3.0, 2.5, 0.4)]
    # Each epoch ended 4 s after the one before: 1 s of reporting beside its 3 s.
    figures = epoch_figures(history, [110.0, 114.0, 118.0], started=100.0, samples=1000)
    assert figures["samples_per_s"] == pytest.approx(2000 / 8)
    assert figures["startup_s"] == pytest.approx(1.0)  # the first epoch began at 101
    assert figures["data_wait_fraction"] == pytest.approx(0.5 / 5.0)
    assert figures["epochs"] == 3 and figures["steady_s"] == pytest.approx(8.0)


def test_figures_need_an_epoch_after_the_warm_up():
    with pytest.raises(ValueError, match="need >= 2"):
        epoch_figures([epoch(1.0, 1.0, 0.0)], [5.0], started=0.0, samples=10)


def test_enough_epochs_for_a_steady_state_on_small_and_large_sets():
    assert steady_epochs(49_000) == 3  # warm-up + two epochs
    assert steady_epochs(1_257) == 1 + 24  # 24 x 1,257 >= 30,000 images


def run(rate, wait=0.01):
    return {"samples_per_s": rate, "startup_s": 5.0, "data_wait_fraction": wait}


def test_the_target_is_met_from_90_percent_of_the_plain_loop():
    runs = {"plain": run(1000.0), "ray1": run(900.0, 0.03), "ray2": run(1700.0)}
    figures = summary(runs)
    assert figures["ray_1w_vs_plain"] == 0.9 and figures["target_ray_1w_ge_90pct_plain"] == "met"
    assert figures["ray_2w_vs_plain"] == 1.7 and figures["data_wait_fraction"] == 0.03
    missed = summary({"plain": run(1000.0), "ray1": run(899.0)})
    assert missed["target_ray_1w_ge_90pct_plain"] == "MISSED"
    assert missed["ray_2w_samples_per_s"] is None
    shown = table(runs, {"skipped": "no CUDA device"})
    assert "| 900 | 0.90 | 5.0 | 3.00% | met |" in shown
    assert "**MISSED**" in table({"plain": run(1000.0), "ray1": run(10.0)}, {"skipped": ""})


def test_only_the_plain_loop_measured_leaves_the_ray_figures_empty():
    figures = summary({"plain": run(1000.0)})
    assert figures["startup_s"] is None and figures["target_ray_1w_ge_90pct_plain"] is None
