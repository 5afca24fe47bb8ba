"""What counts as a finished trial when a search returns: Tune's own count takes a trial
that an interrupt stopped before its first report for a terminated one."""

from __future__ import annotations

from ray.tune import Result

from pipelines.tuning.config import TuneConfig
from pipelines.tuning.tune import finished_trials


def result(metrics: dict, error: Exception | None = None) -> Result:
    return Result(metrics=metrics, checkpoint=None, error=error, path="/nowhere")


def test_a_trial_stopped_before_its_first_report_is_not_finished():
    tune = TuneConfig(epochs=2, scheduler="asha")
    grid = [result({"epoch": 1, "val_accuracy": 0.9}), result({})]
    assert finished_trials(grid, tune) == 1


def test_a_failed_or_diverged_trial_is_finished():
    tune = TuneConfig(epochs=4, scheduler="none")
    grid = [result({}, error=RuntimeError("worker died")), result({"epoch": 0, "diverged": 1.0})]
    assert finished_trials(grid, tune) == 2


def test_without_a_scheduler_a_trial_short_of_its_epochs_was_interrupted():
    tune = TuneConfig(epochs=4, scheduler="none")
    grid = [result({"epoch": 3}), result({"epoch": 1})]
    assert finished_trials(grid, tune) == 1
    # ASHA stops trials early on purpose: the same short trial has finished.
    assert finished_trials(grid, TuneConfig(epochs=4, scheduler="asha")) == 2


def test_synchronous_pbt_is_refused_where_ray_would_stall_it():
    import pytest

    from pipelines.stagekit.errors import UserError
    from pipelines.tuning.tune import check_synchronous, total_trials

    tune = TuneConfig(optimizers=("adam", "rmsprop"), samples=1, scheduler="pbt", synchronous=True)
    check_synchronous(tune, total_trials(tune), resuming=False)  # 2 trials, 2 at once
    with pytest.raises(UserError, match=r"tune.synchronous: 4 trials, 2 at once"):
        more = TuneConfig(
            optimizers=("adam", "rmsprop"), samples=2, scheduler="pbt", synchronous=True
        )
        check_synchronous(more, total_trials(more), resuming=False)
    with pytest.raises(UserError, match=r"cannot resume"):
        check_synchronous(tune, total_trials(tune), resuming=True)
