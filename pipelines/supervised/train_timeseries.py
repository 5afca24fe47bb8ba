"""Stage `train_timeseries`: each recurrent network of `timeseries.kinds` on Ray Train,
beside the classic time-series baselines on the same split, in one table.

Every network is its own MLflow run (experiment `timeseries.experiment`, tagged with its
kind) with the usual per-epoch curves and per-layer gradient norms; its model bundle goes
to `<output>/<kind>/`, where `evaluate_timeseries` and `export_timeseries` take the
`timeseries.model.kind` one. Writes `metrics/timeseries.json`:
`{"lstm": {"test_accuracy": ..., "train_s": ...}, "gru": {...}, "dtw_1nn": {...}, ...}`,
where a network's train_s is its epochs' time and `job_s` adds the Ray Train start-up.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch

from models.architecture import ArchitectureConfig
from pipelines.stagekit import tracking
from pipelines.stagekit.atomic import output_directory, write_json
from pipelines.stagekit.config import Param, TrainConfig, config_to_dict
from pipelines.stagekit.dataset import PreparedData, load_prepared
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.metrics import accuracy_figures
from pipelines.stagekit.model_bundle import (
    build_model,
    check_compatible,
    inference_model,
    save_bundle,
)
from pipelines.stagekit.plots import gradient_norms_png, learning_curves_png, write_csv
from pipelines.stagekit.stage import stage_command
from pipelines.supervised.sequence_baselines import baseline_predictions
from pipelines.supervised.timeseries_config import TimeseriesConfig
from pipelines.training.driver import (
    interrupted_run,
    remember_run,
    run_name,
    supervised_arrays,
    supervised_task,
    train_job,
)
from pipelines.training.loop import without_timings

log = logging.getLogger(__name__)

STAGE = "train_timeseries"
READS = ("kinds", "baselines", "model", "train", "experiment")
CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy")


def test_figures(data: PreparedData, predicted: np.ndarray) -> dict[str, float]:
    y_test = data.y("test")
    return accuracy_figures("test_accuracy", int((predicted == y_test).sum()), len(y_test))


def train_network(
    arch: ArchitectureConfig,
    train: TrainConfig,
    data: PreparedData,
    experiment: str,
    directory: Path,
    plots_dir: Path,
) -> dict[str, Any]:
    """Train `arch` on Ray Train, save its bundle and curves in `directory`; its figures."""
    check_compatible(arch, train, data.manifest, "timeseries.model", "timeseries.train")
    name = run_name(STAGE, config_to_dict(arch), config_to_dict(train), data.data_hash)
    tags = {**tracking.stage_tags(STAGE, data.data_hash), "model_kind": arch.kind}
    resume = interrupted_run(name)
    with tracking.stage_run(experiment, f"{STAGE}-{arch.kind}", tags, resume_run_id=resume) as run:
        remember_run(name, run.run_id)
        run.log_params({"model": config_to_dict(arch), "train": config_to_dict(train)})
        log.info(
            "training %s on %d worker(s): mlflow run %s", arch.kind, train.num_workers, run.run_id
        )
        started = time.perf_counter()
        state = train_job(
            supervised_arrays(data),
            supervised_task(arch, data.manifest, train),
            train,
            name,
            run,
            lr_key="timeseries.train.lr",
        ).state
        job_s = time.perf_counter() - started
        history = state["history"]
        if state["best_model"] is None:
            raise UserError(
                f"{arch.kind}: validation loss never finite (timeseries.train.lr {train.lr:g})"
            )
        network = build_model(arch, data.manifest)
        network.load_state_dict(state["best_model"])
        with torch.no_grad():
            probabilities = inference_model(network, "classification")(
                torch.from_numpy(data.x("test"))
            ).numpy()
        figures = {
            **test_figures(data, probabilities.argmax(axis=1)),
            "train_s": round(sum(h["epoch_seconds"] for h in history), 2),
            "job_s": round(job_s, 2),
            "epochs_run": len(history),
            "best_epoch": int(min(history, key=lambda h: h["val_loss"])["epoch"]),
        }
        directory.mkdir(parents=True)
        model_file = save_bundle(
            directory, network, arch, data.manifest, extra={"history": without_timings(history)}
        )
        tracking.tag_output(run, model_file)
        learning_curves_png(history, directory / "learning_curves.png")
        gradient_norms_png(history, directory / "gradient_norms.png")
        write_csv(plots_dir / f"{arch.kind}.csv", history, CURVE_COLUMNS)
        run.log_metrics({k: float(v) for k, v in figures.items()})
        for image in ("learning_curves.png", "gradient_norms.png"):
            run.log_artifact(directory / image, "plots")
        figures[tracking.RUN_ID_KEY] = run.run_id
    log.info(
        "%s: test accuracy %.4f, %d epochs in %.1f s",
        arch.kind,
        figures["test_accuracy"],
        figures["epochs_run"],
        figures["train_s"],
    )
    return figures


def train_timeseries(
    config: Annotated[TimeseriesConfig, Param("timeseries", reads=READS)],
    data_dir: str = "data/prepared/timeseries",
    output: str = "artifacts/timeseries/models",
    metrics_path: str = "metrics/timeseries.json",
    plots_dir: str = "plots/timeseries/learning_curves",
) -> dict[str, dict[str, Any]]:
    """Train every network of `timeseries.kinds`, then every baseline; returns the table."""
    data = load_prepared(data_dir)
    if data.manifest["input_kind"] != "sequence":
        raise UserError(f"{data_dir}: not a prepared time series; run prepare_timeseries")
    table: dict[str, dict[str, Any]] = {}
    with output_directory(output) as staging:
        for kind in config.kinds:
            arch = dataclasses.replace(config.model, kind=kind)
            table[kind] = train_network(
                arch, config.train, data, config.experiment, staging / kind, Path(plots_dir)
            )
        for name in config.baselines:
            log.info("baseline %s ...", name)
            predicted, seconds = baseline_predictions(name, data, config.train.seed)
            table[name] = {**test_figures(data, predicted), "train_s": round(seconds, 2)}
            log.info(
                "%s: test accuracy %.4f in %.1f s", name, table[name]["test_accuracy"], seconds
            )
    write_json(metrics_path, table)
    return table


if __name__ == "__main__":
    stage_command(train_timeseries, name=STAGE)
