"""One MLflow child run per trial, written by the search's driver process.

Trials never touch MLflow themselves: a dozen processes writing one SQLite file at once
fail with "database is locked". Tune hands every trial's results to callbacks in the
driver, so this callback is the only writer and logs each epoch as it arrives.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from ray.tune import Callback

from pipelines.stagekit import tracking
from pipelines.stagekit.progress import Progress
from pipelines.stagekit.tracking import RunLogger
from pipelines.tuning.config import TuneConfig
from pipelines.tuning.space import tuned_values

log = logging.getLogger(__name__)

TRIAL_TAG = "tune_trial_id"
NUMBER_TAG = "tune_trial"  # the trial's number in the search, as the stage's files give it
CURVE_KEYS = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "lr")


def trial_number(experiment_tag: str) -> int:
    """The trial's number in its search, which Tune's experiment tag starts with
    (`3_lr=...`). The files DVC hashes name trials by it, so the same search writes the same
    bytes: Tune's trial ids are random per search (`d9858_00003`, or a uuid under Optuna);
    MLflow keeps them beside the number."""
    return int(experiment_tag.partition("_")[0])


def trial_status(last: dict[str, Any], max_epochs: int, scheduler: str = "asha") -> str:
    """completed | stopped_early (by the scheduler) | diverged, from a trial's last result."""
    if last.get("diverged"):
        return "diverged"
    if scheduler == "pbt":
        # PBT stops no trial; one it restarted from a leading trial's last checkpoint has
        # nothing left to train and ends without another report.
        return "completed"
    # The model's epoch, not Tune's report count: a trial PBT restarted from another
    # trial's checkpoint goes on from that trial's epoch.
    epochs = int(last["epoch"]) + 1 if "epoch" in last else int(last.get("training_iteration", 0))
    if epochs < max_epochs:
        return "stopped_early"
    return "completed"


class TrialTracking(Callback):
    def __init__(self, parent: RunLogger, tune: TuneConfig, total: int) -> None:
        self.parent = parent
        self.tune = tune
        self.total = total
        self.runs: dict[str, RunLogger] = {}
        self.logged: dict[str, set[int]] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.ended: dict[str, int] = {}  # status -> trials
        self.best: tuple[float, str] | None = None  # (figure, "optimizer lr")
        # Made at the first trial event (a resumed search counts its finished trials); never
        # pickled: Tune saves its callbacks with the search, and a bar holds a terminal.
        self.progress: Progress | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "progress": None}

    def _progress(self, trials: list) -> Progress:
        if self.progress is None:
            done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
            self.progress = Progress(self.total, "trials", log, unit="trial", initial=done)
        return self.progress

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.progress is not None:
            self.progress.close()

    def setup(self, **info: Any) -> None:
        # A resumed search: its trials already have runs.
        self.runs = tracking.child_runs(self.parent, self.tune.experiment, TRIAL_TAG)
        # Epochs already logged: a resumed trial may report some of them again.
        self.logged = {tid: run.logged_steps("val_loss") for tid, run in self.runs.items()}

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        settings = tuned_values(trial.config, self.tune)
        searched = "".join(f", {key} {trial.config.get(key)}" for key in self.tune.space)
        tally = self._tally(_running(trials, trial) + 1)
        event = f"trial {trial.trial_id} started: {_setting(settings)}{searched}"
        self._progress(trials).note(tally, line=f"{event}; {tally}")
        if trial.trial_id in self.runs:
            return
        run = tracking.start_child_run(
            self.parent,
            self.tune.experiment,
            f"trial-{trial.trial_id}",
            {
                TRIAL_TAG: trial.trial_id,
                NUMBER_TAG: str(trial_number(trial.experiment_tag)),
                "optimizer": settings["train"]["optimizer"],
            },
        )
        run.log_params(settings)
        self.runs[trial.trial_id] = run
        self.logged[trial.trial_id] = set()

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        self.last[trial.trial_id] = result
        run = self.runs.get(trial.trial_id)
        if run is None or "epoch" not in result:
            return
        epoch = int(result["epoch"])
        if epoch in self.logged[trial.trial_id]:
            return
        self.logged[trial.trial_id].add(epoch)
        curves = {
            k: float(result[k])
            for k in CURVE_KEYS
            if k in result and math.isfinite(float(result[k]))
        }
        run.log_metrics(curves, step=epoch)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = self.last.get(trial.trial_id, trial.last_result or {})
        status = trial_status(last, self.tune.epochs, self.tune.scheduler)
        self._end(trials, trial, status, last)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trials, trial, "error", self.last.get(trial.trial_id, {}))

    def _end(self, trials: list, trial: Any, status: str, last: dict[str, Any]) -> None:
        self.ended[status] = self.ended.get(status, 0) + 1
        epochs = int(last.get("training_iteration", 0))
        figure = last.get(self.tune.metric)
        if isinstance(figure, float) and math.isfinite(figure):
            better = self.best is None or (
                figure > self.best[0] if self.tune.mode == "max" else figure < self.best[0]
            )
            if better:
                self.best = (figure, _setting(tuned_values(trial.config, self.tune)))
        shown = f", {self.tune.metric} {figure:.4f}" if isinstance(figure, float) else ""
        tally = self._tally(_running(trials, trial))
        event = f"trial {trial.trial_id} {status.replace('_', ' ')} after {epochs} epoch(s){shown}"
        self._progress(trials).step(tally, line=f"{event}; {tally}")
        run = self.runs.get(trial.trial_id)
        if run is None:
            return
        run.set_tags({"status": status, "epochs": str(epochs)})
        mlflow_status = {"completed": "FINISHED", "stopped_early": "KILLED"}.get(status, "FAILED")
        run.end(mlflow_status)

    def _tally(self, running: int) -> str:
        """running / completed / stopped early / best so far, as the progress line shows."""
        stopped = self.ended.get("stopped_early", 0)
        parts = [f"{max(running, 0)} running", f"{self.ended.get('completed', 0)} done"]
        parts.append(f"{stopped} stopped early")
        failed = sum(n for s, n in self.ended.items() if s not in ("completed", "stopped_early"))
        if failed:
            parts.append(f"{failed} diverged/failed")
        if self.best is not None:
            parts.append(f"best {self.best[0]:.4f} ({self.best[1]})")
        return ", ".join(parts)


def _running(trials: list, trial: Any) -> int:
    """Trials running now, besides `trial` (whose own status may lag the event)."""
    return sum(t.status == "RUNNING" and t is not trial for t in trials)


def _setting(settings: dict[str, Any]) -> str:
    return f"{settings['train']['optimizer']} lr {settings['train']['lr']:.3g}"
