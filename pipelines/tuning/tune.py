"""Stage `tune`: a Ray Tune search over optimizers, learning rates and other settings.

Each trial runs the training stages' own worker loop on the supervised task
(pipelines/tuning/trial.py: in the trial's actor for one worker, a Ray Train run through the
stages' driver for several); its per-epoch reports reach the scheduler: ASHA (the default)
stops trailing trials between epochs, PBT restarts them from leading trials' checkpoints
with perturbed settings (its population: the trials running at once; with
`tune.synchronous` they wait for each other at each perturbation point). A diverging trial
ends itself and is reported as diverged; the search goes on. The driver logs a parent
MLflow run with one child run per trial.

An interrupted search (Ctrl-C, a lost driver) resumes where it stopped when the stage runs
again with the same params, code and data: finished trials are kept, not re-run.

Writes `best_params.yaml` (the best trial's settings; `train_supervised` trains with them
when params.yaml says `tuned_params: artifacts/tune/best_params.yaml`), `results.csv`,
`metrics/tune.json` and two plots.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Annotated, Any

import yaml

from models.architecture import ArchitectureConfig
from pipelines.stagekit import tracking
from pipelines.stagekit.atomic import output_directory, write_json, write_text
from pipelines.stagekit.config import Param, TrainConfig, config_to_dict
from pipelines.stagekit.dataset import load_prepared
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.metrics import accuracy_figures
from pipelines.stagekit.model_bundle import check_compatible
from pipelines.stagekit.plots import best_curves_png, lr_sweep_png, write_csv
from pipelines.stagekit.stage import stage_command
from pipelines.training.cluster import remove_orphaned_placement_groups
from pipelines.training.driver import (
    forget_run,
    interrupted_run,
    remember_run,
    run_name,
    storage_path,
    supervised_arrays,
)
from pipelines.tuning.config import TuneConfig, workers_at_once
from pipelines.tuning.space import (
    LR_SCALE,
    check_space,
    clip_lr_scale,
    learning_rate,
    num_samples,
    param_space,
    trial_settings,
    tuned_values,
)

log = logging.getLogger(__name__)

STAGE = "tune"
BEST_PARAMS_FILE = "best_params.yaml"
RESULTS_FILE = "results.csv"


def tune_search(
    model: Annotated[ArchitectureConfig, Param("model")],
    train: Annotated[TrainConfig, Param("train")],
    tune: Annotated[TuneConfig, Param("tune")],
    data_dir: str = "data/prepared/supervised",
    output: str = "artifacts/tune",
    metrics_path: str = "metrics/tune.json",
    plots_dir: str = "plots/tune",
) -> dict[str, Any]:
    data = load_prepared(data_dir)
    if data.task != "classification" and tune.metric == "val_accuracy":
        raise UserError("tune.metric: val_accuracy needs a classification task; use val_loss")
    if "model.kind" not in tune.space:  # else every kind searched is checked below
        check_compatible(model, train, data.manifest)
    check_space(model, train, tune)
    check_space_fits(model, train, tune, data.manifest)
    if tune.search == "optuna":
        _require_optuna()
    name = run_name(
        STAGE,
        config_to_dict(tune),
        config_to_dict(model),
        config_to_dict(train),
        data.data_hash,
    )
    experiment_dir = Path(storage_path()) / name
    resume_id = interrupted_run(name)
    total = total_trials(tune)
    if tune.scheduler == "pbt" and tune.synchronous:
        check_synchronous(tune, total, resume_id is not None)
    tags = tracking.stage_tags(STAGE, data.data_hash)
    with tracking.stage_run(tune.experiment, STAGE, tags, resume_run_id=resume_id) as parent:
        remember_run(name, parent.run_id)
        if resume_id is None:
            parent.log_params({"tune": config_to_dict(tune), "model": config_to_dict(model)})
        tuner = make_tuner(model, train, tune, data, name, parent, total, experiment_dir)
        grid = tuner.fit()
        remove_orphaned_placement_groups()  # else a stopped trial's CPUs may stay held
        finished = finished_trials(grid, tune)
        if finished < total:
            # Tune returns (not raises) on Ctrl-C, its state saved: keep it for a resume.
            log.warning(
                "search interrupted with %d of %d trials finished; run the stage again "
                "(same params) to resume it",
                finished,
                total,
            )
            raise KeyboardInterrupt
        rows, curves = trial_rows(grid, tune)
        summary = summarize(rows, tune)
        best = summary.pop("_best")
        if tune.metric == "val_accuracy":
            # The interval of that one trial's figure; picked as the best of many on the
            # same validation split, it flatters (the test split is the unbiased check).
            n = len(data.y("val"))
            accuracy = summary["best_val_accuracy"]
            summary.update(accuracy_figures("best_val_accuracy", round(accuracy * n), n))
        if tune.scheduler == "pbt":
            summary["pbt_exploits"] = pbt_exploits(experiment_dir)
        with output_directory(output) as staging:
            write_text(staging / BEST_PARAMS_FILE, best_params_yaml(best, summary, tune))
            write_csv(staging / RESULTS_FILE, rows, result_columns(tune))
        plots = Path(plots_dir)
        lr_sweep_png(rows, tune.metric, plots / "lr_sweep.png")
        best_curves_png(
            best_per_optimizer(rows, curves, tune), tune.metric, plots / "best_curves.png"
        )
        write_json(metrics_path, {**summary, tracking.RUN_ID_KEY: parent.run_id})
        parent.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, (int, float))})
        parent.set_tags({"best_trial": best["trial_id"], "best_optimizer": best["optimizer"]})
        from pipelines.tuning.trial_tracking import TRIAL_TAG  # Ray Tune: imported when used

        for child_id, run in tracking.child_runs(parent, tune.experiment, TRIAL_TAG).items():
            if child_id == best["trial_id"]:
                run.set_tags({"best_trial": "true"})
        parent.log_artifact(Path(output) / BEST_PARAMS_FILE)
        parent.log_artifact(Path(output) / RESULTS_FILE)
        for image in ("lr_sweep.png", "best_curves.png"):
            parent.log_artifact(plots / image, "plots")
    # The search is over: a later run with these settings starts afresh.
    shutil.rmtree(experiment_dir, ignore_errors=True)
    forget_run(name)
    for row in rows:  # each trial's Train runs: tune-<id>, and tune-<id>-<n> under PBT
        for run in Path(storage_path()).glob(f"tune-{row['trial_id']}*"):
            shutil.rmtree(run, ignore_errors=True)
    log.info(
        "best of %d trials: %s lr %.3g, %s %.4f (%d stopped early, %d diverged; %d epochs)",
        summary["trials"],
        summary["best_optimizer"],
        summary["best_lr"],
        tune.metric,
        summary[f"best_{tune.metric}"],
        summary["trials_stopped_early"],
        summary["trials_diverged"],
        summary["epochs_total"],
    )
    return summary


def check_space_fits(
    model: ArchitectureConfig, train: TrainConfig, tune: TuneConfig, manifest: dict[str, Any]
) -> None:
    """Fail before any trial starts when a `model.*` value of the space cannot take this
    data (e.g. `model.kind: [cnn, lstm]` on time series: only the recurrent kinds read
    sequences), naming the key and value."""
    for key, values in tune.space.items():
        if not key.startswith("model."):
            continue
        for value in values:
            sample = {"optimizer": tune.optimizers[0], LR_SCALE: 0.0, key: value}
            trial_model, trial_train = trial_settings(model, train, tune, sample)
            check_compatible(trial_model, trial_train, manifest, f"tune.space.{key}: {value!r}")


def check_synchronous(tune: TuneConfig, total: int, resuming: bool) -> None:
    """Refuse what Ray's synchronous PBT cannot do (TuneConfig.synchronous)."""
    if total > tune.max_concurrent_trials:
        raise UserError(
            f"tune.synchronous: {total} trials, {tune.max_concurrent_trials} at once; "
            "synchronous PBT needs every trial running at once (raise "
            "tune.max_concurrent_trials or set tune.synchronous: false)"
        )
    if resuming:
        raise UserError(
            "tune.synchronous: an interrupted synchronous PBT search cannot resume (Ray "
            "restarts its perturbation points and every trial waits); set "
            "tune.synchronous: false, or change a tune setting to start anew"
        )


def pbt_exploits(experiment_dir: Path) -> int:
    """How many times PBT restarted a trial from a better one's checkpoint (Tune logs one
    line per exploit in the experiment's pbt_global.txt)."""
    log_file = experiment_dir / "pbt_global.txt"
    if not log_file.is_file():
        return 0
    return sum(1 for line in log_file.read_text().splitlines() if line.strip())


def total_trials(tune: TuneConfig) -> int:
    if tune.search == "grid":
        return len(tune.optimizers) * tune.samples * math.prod(len(v) for v in tune.space.values())
    return num_samples(tune) * (len(tune.optimizers) if tune.search == "random" else 1)


def make_tuner(
    model: ArchitectureConfig,
    train: TrainConfig,
    tune: TuneConfig,
    data,
    name: str,
    parent,
    total: int,
    experiment_dir: Path,
):
    """A new Tuner, or the interrupted one restored from `experiment_dir`."""
    from ray import tune as ray_tune

    from pipelines.training.cluster import (
        connect_ray,
        place_workers,
        require_resources,
        state_api_answers,
    )
    from pipelines.tuning.trial import run_trial, trains_in_trial_actor, trial_resources
    from pipelines.tuning.trial_tracking import TrialTracking

    connect_ray()
    placed = place_workers(
        tune.device, tune.workers_per_trial, "tune.device", workers_at_once(tune)
    )
    log.info("trials: %s", placed.summary)
    if not placed.use_gpu:
        require_resources(
            "CPU",
            tune.workers_per_trial,
            f"tune.workers_per_trial={tune.workers_per_trial}",
            "lower tune.workers_per_trial",
        )
    if tune.scheduler != "none" and not trains_in_trial_actor(tune) and not state_api_answers():
        # Ray Train frees the workers of a trial that Tune stops early only once its
        # PlacementGroupCleaner sees (through the State API) that the trial is gone.
        log.warning(
            "Ray's State API does not answer (dashboard off?): the CPUs/GPUs of trials "
            "that %s stops early stay reserved until the search ends, and later trials "
            "may wait for them; start Ray with its dashboard (the default)",
            tune.scheduler,
        )
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(
            run_trial,
            arrays=supervised_arrays(data),
            manifest=data.manifest,
            model=model,
            train=train,
            tune=tune,
        ),
        trial_resources(tune, placed),
    )
    # Tune saves the search's state at most every 10 s by default; a driver killed outright
    # (SIGKILL: nothing saves on the way out) then loses the trials finished since, and the
    # restored search runs them again. Saved after every event instead: a few KB a time.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    # Tune warns on reports that a trial keeping few checkpoints forces such a save "too
    # often": saving that often is the point here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    if ray_tune.Tuner.can_restore(experiment_dir):
        log.info("resuming the interrupted search in %s (finished trials are kept)", experiment_dir)
        return ray_tune.Tuner.restore(
            str(experiment_dir), trainable, resume_unfinished=True, resume_errored=True
        )
    log.info(
        "searching %d trial(s) over %s (%s search, scheduler %s), %d at a time",
        total,
        ", ".join(tune.optimizers),
        tune.search,
        tune.scheduler,
        tune.max_concurrent_trials,
    )
    return ray_tune.Tuner(
        trainable,
        param_space=param_space(tune),
        tune_config=ray_tune.TuneConfig(
            metric=tune.metric,
            mode=tune.mode,
            num_samples=num_samples(tune),
            search_alg=_searcher(tune),
            scheduler=_scheduler(tune),
            # A one-worker trial's actor has imported torch and the stages' code and holds
            # the arrays: the next trial reuses it (Tune resets the function's session)
            # instead of starting a process of its own. Measured on 2 CPUs: the default
            # search (20 trials) 86 -> 57 s, the same trials' figures. Not for Train-run
            # trials: their run's thread and queues end only with the actor.
            reuse_actors=trains_in_trial_actor(tune),
        ),
        run_config=ray_tune.RunConfig(
            name=name,
            storage_path=storage_path(),
            checkpoint_config=_checkpoint_config(tune),
            # A trial that trains in its own actor is restarted by Tune, from its last
            # checkpoint; a Train run restarts its own workers (run_training).
            failure_config=ray_tune.FailureConfig(
                max_failures=train.max_failures if trains_in_trial_actor(tune) else 0
            ),
            callbacks=[TrialTracking(parent, tune, total)],
            verbose=0,  # progress comes from TrialTracking (a bar, or a line per trial event)
        ),
    )


def _checkpoint_config(tune: TuneConfig):
    """Tune keeps every checkpoint under PBT (it may restart a trial from a leading trial's
    earlier epochs; the search's folder goes when it ends), else each trial's last two. Not
    one: Tune deletes the one before as a new one arrives and saves the search's state
    after, so a driver killed in between (SIGKILL: nothing saves on the way out) would leave
    a state naming a deleted checkpoint, and the restored trial could not resume."""
    from ray import tune as ray_tune

    return ray_tune.CheckpointConfig(num_to_keep=None if tune.scheduler == "pbt" else 2)


def _scheduler(tune: TuneConfig):
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if tune.scheduler == "none":
        return FIFOScheduler()
    if tune.scheduler == "pbt":
        # Tune keeps every checkpoint (PBT may read a leading trial's epochs later; the
        # search's folder goes when it ends). Only train.* settings are perturbed: a trial
        # goes on with the optimizer whose moments it took, and with the model whose weights
        # it took (even dropout: at 0 the network has no Dropout layer, other weight names).
        settings = {
            "time_attr": "training_iteration",
            "perturbation_interval": tune.perturbation_interval,
            "hyperparam_mutations": {
                LR_SCALE: ray_tune.uniform(0.0, 1.0),
                **{
                    key: list(values)
                    for key, values in tune.space.items()
                    if key.startswith("train.")
                },
            },
            "custom_explore_fn": clip_lr_scale,
        }
        if tune.synchronous:
            from pipelines.tuning.pbt import SynchronousPbt

            return SynchronousPbt(**settings)
        return PopulationBasedTraining(**settings)
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=tune.epochs,
        grace_period=tune.grace_period,
        reduction_factor=tune.reduction_factor,
    )


def _searcher(tune: TuneConfig):
    """The search algorithm, limited to `max_concurrent_trials` at once (Tune ignores
    TuneConfig's limit when given a search algorithm)."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if tune.search != "optuna":
        return BasicVariantGenerator(
            max_concurrent=tune.max_concurrent_trials, random_state=tune.seed
        )
    from ray.tune.search.optuna import OptunaSearch

    searcher = OptunaSearch(metric=tune.metric, mode=tune.mode, seed=tune.seed)
    return ConcurrencyLimiter(searcher, max_concurrent=tune.max_concurrent_trials)


def _require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError(
            "tune.search: optuna needs the optuna package: pip install optuna "
            "(or use random or grid)"
        ) from None


def finished_trials(grid, tune: TuneConfig) -> int:
    """Trials of `grid` that ran to their end: failed, or reported and were not cut short
    by an interrupt. Not Tune's own count: on Ctrl-C it marks a trial that was still
    starting (no report yet) as terminated, and without a scheduler a trial that stopped
    before its last epoch can only have been interrupted (its saved state resumes it):
    trials train with early stopping off (`trial_settings`), and a diverged one says so."""
    from pipelines.tuning.trial_tracking import trial_status

    finished = 0
    for result in grid:
        if result.error:
            finished += 1
        elif result.metrics and not (
            tune.scheduler == "none"
            and trial_status(result.metrics, tune.epochs, tune.scheduler) == "stopped_early"
        ):
            finished += 1
    return finished


def trial_rows(grid, tune: TuneConfig) -> tuple[list[dict[str, Any]], dict[str, list[dict]]]:
    """One row per trial (its settings, status, best figures) and each trial's curves."""
    from pipelines.tuning.trial_tracking import trial_number, trial_status

    rows, curves = [], {}
    for result in grid:
        frame = result.metrics_dataframe
        reports = [] if frame is None else frame.to_dict("records")
        history = [r for r in reports if "epoch" in r and not _flag(r.get("diverged"))]
        last = reports[-1] if reports else {}
        trial_id = _trial_id(result)
        status = "error" if result.error else trial_status(last, tune.epochs, tune.scheduler)
        settings = tuned_values(result.config, tune)
        scored = [h for h in history if _finite(h.get(tune.metric))]
        if tune.scheduler == "pbt":
            # A PBT trial's earlier epochs may belong to weights and settings it has since
            # dropped for a leading trial's: it is judged by where it ended.
            scored = scored[-1:]
        pick = max if tune.mode == "max" else min
        best = pick(scored, key=lambda h: h[tune.metric]) if scored else {}
        rows.append(
            {
                "trial_id": trial_id,
                "trial": trial_number(_experiment_tag(result, trial_id)),
                "optimizer": result.config["optimizer"],
                "lr": learning_rate(tune, result.config["optimizer"], result.config[LR_SCALE]),
                **{key: _space_value(settings, key) for key in tune.space},
                "status": status,
                "epochs": len(history),
                tune.metric: best.get(tune.metric, math.nan),
                "best_epoch": int(best["epoch"]) if best else -1,
                "settings": settings,
            }
        )
        curves[trial_id] = history
    return rows, curves


def summarize(rows: list[dict[str, Any]], tune: TuneConfig) -> dict[str, Any]:
    usable = [
        r for r in rows if r["status"] not in ("diverged", "error") and _finite(r[tune.metric])
    ]
    if not usable:
        raise UserError(
            f"no trial finished with a finite {tune.metric}: every one diverged or failed; "
            "lower the learning-rate ranges in tune.lr"
        )
    pick = max if tune.mode == "max" else min
    best = pick(usable, key=lambda r: r[tune.metric])
    return {
        f"best_{tune.metric}": float(best[tune.metric]),
        "best_optimizer": best["optimizer"],
        "best_lr": float(best["lr"]),
        "best_trial": best["trial"],
        "trials": len(rows),
        "trials_stopped_early": sum(r["status"] == "stopped_early" for r in rows),
        "trials_diverged": sum(r["status"] == "diverged" for r in rows),
        "trials_failed": sum(r["status"] == "error" for r in rows),
        "epochs_total": sum(r["epochs"] for r in rows),
        "optimizers": list(tune.optimizers),
        "search": tune.search,
        "scheduler": tune.scheduler,
        "_best": best,
    }


def best_per_optimizer(rows, curves, tune: TuneConfig) -> dict[str, list[dict]]:
    pick = max if tune.mode == "max" else min
    best: dict[str, list[dict]] = {}
    for optimizer in tune.optimizers:
        mine = [r for r in rows if r["optimizer"] == optimizer and _finite(r[tune.metric])]
        if mine:
            best[optimizer] = curves[pick(mine, key=lambda r: r[tune.metric])["trial_id"]]
    return best


def best_params_yaml(best: dict[str, Any], summary: dict[str, Any], tune: TuneConfig) -> str:
    header = (
        "# Written by the `tune` stage: the best trial's settings "
        f"({tune.metric} {best[tune.metric]:.4f}, trial {best['trial']} of "
        f"{summary['trials']}).\n"
        "# Train with them: set `tuned_params: artifacts/tune/best_params.yaml` in params.yaml\n"
        "# (train_supervised lays them over `train` and `model`), then `dvc repro`.\n"
    )
    return header + yaml.safe_dump(best["settings"], sort_keys=False)


def result_columns(tune: TuneConfig) -> list[str]:
    return [
        "trial",
        "optimizer",
        "lr",
        *tune.space,
        "status",
        "epochs",
        tune.metric,
        "best_epoch",
    ]


def _trial_id(result) -> str:
    """The trial's own id, from its folder (`<trainable>_<id>_<n>_<settings>_<date>`): its
    last metrics may be another trial's when PBT restarted it from that trial's checkpoint
    and it failed or ended before reporting."""
    found = re.search(r"_([0-9a-f]+_\d{5})_", Path(result.path).name)
    return found.group(1) if found else str(result.metrics.get("trial_id"))


def _experiment_tag(result, trial_id: str) -> str:
    """The trial's experiment tag (`<number>_<settings>`), from its folder name after the id."""
    _, found, tag = Path(result.path).name.partition(f"_{trial_id}_")
    return tag if found else str(result.metrics.get("experiment_tag", ""))


def _space_value(settings: dict[str, dict[str, Any]], key: str) -> Any:
    section, _, name = key.partition(".")
    return settings[section][name]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _flag(value: Any) -> bool:
    return _finite(value) and bool(value)


if __name__ == "__main__":
    stage_command(tune_search, name=STAGE)
