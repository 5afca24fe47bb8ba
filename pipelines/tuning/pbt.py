"""Synchronous PBT that goes on when a trial leaves the population.

Ray 2.60's synchronous `PopulationBasedTraining` pauses each trial at a perturbation point
until every live trial has reached it, and perturbs when the last one reports. Two ways a
search then stalls for good (found by review, 2026-12-04):

- a trial that ends itself (dlpipe's divergence check) while the others wait: they are
  paused at the point, and no report is left to come that would start the perturbation;
- a trial that fails: Tune keeps it among the live trials, behind the point for ever, and
  every report of the others finds it missing.

`SynchronousPbt` counts only unfinished trials as the ones to wait for, and when the
others are all paused at the point (nothing left to report), perturbs as the last report
would have, from the scheduler's turn to choose the next trial to run. Imported only where
a search is built (it subclasses Ray's scheduler).
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import PopulationBasedTraining


class _UnfinishedOnly:
    """The Tune controller as PBT's synchronous check should see it: its live trials less
    those that are finished (a failed trial stays live in Ray's controller)."""

    def __init__(self, controller: Any) -> None:
        self._controller = controller

    def get_live_trials(self) -> list[Trial]:
        return [t for t in self._controller.get_live_trials() if not t.is_finished()]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._controller, name)


class SynchronousPbt(PopulationBasedTraining):
    """`PopulationBasedTraining(synch=True)` that does not wait for finished trials."""

    def __init__(self, **settings: Any) -> None:
        super().__init__(synch=True, **settings)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict) -> str:
        return super().on_trial_result(_UnfinishedOnly(tune_controller), trial, result)

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        self._perturb_if_all_waiting(tune_controller)
        return super().choose_trial_to_run(tune_controller)

    def _perturb_if_all_waiting(self, tune_controller: Any) -> None:
        """When every unfinished trial is paused at the perturbation point, none will report
        again: perturb now, through the last waiting trial's report at the point."""
        unfinished = _UnfinishedOnly(tune_controller).get_live_trials()
        waiting = [
            t
            for t in unfinished
            if t.status == Trial.PAUSED
            and self._trial_state[t].last_train_time >= self._next_perturbation_sync
            and self._trial_state[t].last_result is not None
        ]
        if not waiting or len(waiting) < len(unfinished):
            return  # a trial still has to report (or there is none): the usual path
        # Its report at the point, again: it passes the interval check as it did (no
        # perturbation since), and now finds no trial to wait for. (Were the point ever
        # moved past the trials, to the latest train time, the check would refuse it; with
        # training_iteration and trials of equal length that does not happen.)
        last = max(waiting, key=lambda t: self._trial_state[t].last_train_time)
        self.on_trial_result(tune_controller, last, self._trial_state[last].last_result)
