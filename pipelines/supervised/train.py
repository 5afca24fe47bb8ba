"""Stage `train_supervised`: train the classifier/regressor on Ray Train, tracked in MLflow.

Reads the prepared data and params `model` + `train` (with `tuned_params` laid over them:
nothing by default, the `tune` stage's best settings when opted in); writes the trained model bundle,
the learning-curve data for `dvc plots`, and `metrics/train_supervised.json`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

from models.architecture import ArchitectureConfig
from pipelines.stagekit import tracking
from pipelines.stagekit.atomic import output_directory, write_json
from pipelines.stagekit.config import Param, TrainConfig, config_to_dict, overlay_sections
from pipelines.stagekit.dataset import load_prepared
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.metrics import accuracy_figures
from pipelines.stagekit.model_bundle import (
    build_model,
    check_compatible,
    fit_warnings,
    save_bundle,
)
from pipelines.stagekit.plots import gradient_norms_png, learning_curves_png, write_csv
from pipelines.stagekit.stage import stage_command
from pipelines.supervised.config import TrackingConfig
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

STAGE = "train_supervised"
CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy")


def train_supervised(
    model: Annotated[ArchitectureConfig, Param("model")],
    train: Annotated[TrainConfig, Param("train")],
    tracking_config: Annotated[TrackingConfig, Param("tracking")],
    tuned_params: Annotated[str, Param("tuned_params")] = "pipelines/tuning/untuned.yaml",
    data_dir: str = "data/prepared/supervised",
    output: str = "artifacts/supervised/model",
    metrics_path: str = "metrics/train_supervised.json",
    plots_dir: str = "plots/supervised",
) -> dict:
    """Train `model` with `train`, the `tuned_params` file's settings laid over both (an
    empty file by default; the `tune` stage's best_params.yaml when opted in)."""
    tuned = overlay_sections(tuned_params, {"model": model, "train": train})
    model, train = tuned["model"], tuned["train"]
    data = load_prepared(data_dir)
    check_compatible(model, train, data.manifest)
    for warning in fit_warnings(model, data.manifest, len(data.y("train"))):
        log.warning(warning)
    name = run_name(STAGE, config_to_dict(model), config_to_dict(train), data.data_hash)
    tags = tracking.stage_tags(STAGE, data.data_hash)
    # A re-run after an interruption resumes its checkpoints and its MLflow run.
    resume = interrupted_run(name)
    with tracking.stage_run(tracking_config.experiment, STAGE, tags, resume_run_id=resume) as run:
        remember_run(name, run.run_id)
        run.log_params(
            {
                "model": config_to_dict(model),
                "train": config_to_dict(train),
                "data.task": data.task,
                "data.input_shape": data.input_shape,
                "data.train_size": len(data.y("train")),
            }
        )
        log.info(
            "training %s on %d worker(s): ray run %s, mlflow run %s",
            model.kind,
            train.num_workers,
            name,
            run.run_id,
        )
        state = train_job(
            supervised_arrays(data),
            supervised_task(model, data.manifest, train),
            train,
            name,
            run,
        ).state
        history = state["history"]
        if state["best_model"] is None:  # no epoch produced a finite validation loss
            raise UserError(
                f"no usable epoch: validation loss never finite (train.lr {train.lr:g})"
            )
        network = build_model(model, data.manifest)
        network.load_state_dict(state["best_model"])
        best = min(history, key=lambda h: h["val_loss"])
        summary = {
            "best_epoch": int(best["epoch"]),
            "epochs_run": len(history),
            "best_val_loss": best["val_loss"],
            **(
                accuracy_figures(
                    "best_val_accuracy",
                    round(best["val_accuracy"] * len(data.y("val"))),
                    len(data.y("val")),
                )
                if "val_accuracy" in best
                else {}
            ),
            "stopped_early": len(history) < train.epochs,
        }
        with output_directory(output) as staging:
            model_file = save_bundle(
                staging,
                network,
                model,
                data.manifest,
                extra={"history": without_timings(history)},
            )
            run.set_tags({"ray_run": name})
            tracking.tag_output(run, model_file)
            learning_curves_png(history, staging / "learning_curves.png")
            gradient_norms_png(history, staging / "gradient_norms.png")
        write_csv(Path(plots_dir) / "learning_curves.csv", history, CURVE_COLUMNS)
        write_json(metrics_path, {**summary, tracking.RUN_ID_KEY: run.run_id})
        run.log_metrics({k: float(v) for k, v in summary.items()})
        for image in ("learning_curves.png", "gradient_norms.png"):
            run.log_artifact(Path(output) / image, "plots")
    log.info(
        "best epoch %d of %d: val_loss %.4f%s",
        summary["best_epoch"] + 1,
        summary["epochs_run"],
        summary["best_val_loss"],
        f", val_accuracy {summary['best_val_accuracy']:.4f}"
        if "best_val_accuracy" in summary
        else "",
    )
    return summary


if __name__ == "__main__":
    stage_command(train_supervised, name=STAGE)
