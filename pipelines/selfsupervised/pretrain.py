"""Stage `pretrain_mlm`: masked-language-model pretraining of the transformer encoder on
Ray Train, tracked in MLflow, with its held-out figures beside two baselines.

Reads the packed token blocks and tokenizer from `prepare_mlm` and params `mlm` (its
mask_probability, model, train and experiment); writes the model folder (weights, config,
tokenizer), `metrics/mlm.json` and the learning curves.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

from pipelines.selfsupervised.bundle import build_mlm, save_mlm_bundle
from pipelines.selfsupervised.config import MlmConfig
from pipelines.selfsupervised.figures import baseline_figures, model_figures, token_counts
from pipelines.selfsupervised.masked_data import check_prepared, masking_spec, validation_arrays
from pipelines.selfsupervised.tokenizer import TOKENIZER_FILE
from pipelines.stagekit import tracking
from pipelines.stagekit.atomic import output_directory, write_json
from pipelines.stagekit.config import Param, config_to_dict
from pipelines.stagekit.dataset import load_prepared
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.metrics import accuracy_figures
from pipelines.stagekit.model_bundle import MODEL_FILE
from pipelines.stagekit.plots import learning_curves_png, write_csv
from pipelines.stagekit.stage import stage_command
from pipelines.training.driver import interrupted_run, remember_run, run_name, train_job
from pipelines.training.loop import without_timings
from pipelines.training.tasks import MaskedLmTask

log = logging.getLogger(__name__)

STAGE = "pretrain_mlm"
CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy")
PRETRAIN_KEYS = ("mask_probability", "model", "train", "experiment")


def pretrain_mlm(
    mlm: Annotated[MlmConfig, Param("mlm", reads=PRETRAIN_KEYS)],
    data_dir: str = "data/prepared/mlm",
    output: str = "artifacts/mlm/model",
    metrics_path: str = "metrics/mlm.json",
    plots_dir: str = "plots/mlm",
) -> dict:
    data = load_prepared(data_dir)
    check_prepared(mlm, data)
    manifest = data.manifest
    arrays = validation_arrays(mlm, data)
    special = sorted(manifest["special_ids"].values())
    baselines = baseline_figures(
        token_counts(data.x("train"), manifest["vocab_size"], special), arrays["y_val"], special
    )
    task = MaskedLmTask(mlm.model, masking_spec(mlm, manifest), manifest["special_ids"]["[PAD]"])
    name = run_name(
        STAGE,
        config_to_dict(mlm.model),
        config_to_dict(mlm.train),
        mlm.mask_probability,
        data.data_hash,
    )
    # A re-run after an interruption resumes its checkpoints and its MLflow run.
    with tracking.stage_run(
        mlm.experiment,
        STAGE,
        tracking.stage_tags(STAGE, data.data_hash),
        resume_run_id=interrupted_run(name),
    ) as run:
        remember_run(name, run.run_id)
        run.log_params(
            {
                "model": config_to_dict(mlm.model),
                "train": config_to_dict(mlm.train),
                "mask_probability": mlm.mask_probability,
                "vocab_size": manifest["vocab_size"],
                "train_tokens": manifest["splits"]["train"]["tokens"],
                "train_blocks": manifest["splits"]["train"]["blocks"],
                "val_masked_tokens": baselines["val_masked_tokens"],
            }
        )
        log.info(
            "pretraining a %d-layer encoder (width %d) on %d blocks of %d tokens, %d worker(s): "
            "ray run %s, mlflow run %s",
            mlm.model.layers,
            mlm.model.width,
            manifest["splits"]["train"]["blocks"],
            mlm.model.max_length,
            mlm.train.num_workers,
            name,
            run.run_id,
        )
        state = train_job(arrays, task, mlm.train, name, run, lr_key="mlm.train.lr").state
        history = state["history"]
        if state["best_model"] is None:
            raise UserError(
                f"no usable epoch: validation loss never finite (mlm.train.lr {mlm.train.lr:g})"
            )
        best = min(history, key=lambda h: h["val_loss"])
        figures = {
            **model_figures(best["val_loss"], best["val_accuracy"]),
            **baselines,
            "best_epoch": int(best["epoch"]),
            "epochs_run": len(history),
            "train_tokens": manifest["splits"]["train"]["tokens"],
            "padding_fraction": manifest["splits"]["train"]["padding_fraction"],
        }
        masked = baselines["val_masked_tokens"]  # both accuracies count these positions
        for name in ("masked_accuracy", "baseline_masked_accuracy"):
            figures.update(accuracy_figures(name, round(figures[name] * masked), masked))
        model = build_mlm(mlm.model, manifest)
        model.load_state_dict(state["best_model"])
        with output_directory(output) as staging:
            save_mlm_bundle(
                staging,
                model,
                manifest,
                Path(data_dir) / TOKENIZER_FILE,
                {"history": without_timings(history)},
            )
            run.set_tags({"ray_run": name})
            tracking.tag_output(run, staging / MODEL_FILE)
            learning_curves_png(history, staging / "learning_curves.png")
        write_csv(Path(plots_dir) / "learning_curves.csv", history, CURVE_COLUMNS)
        write_json(metrics_path, {**figures, tracking.RUN_ID_KEY: run.run_id})
        run.log_metrics({k: float(v) for k, v in figures.items()})
        run.log_artifact(Path(output) / "learning_curves.png", "plots")
    # A mapping as the one argument: the format names the figures it prints.
    log.info(
        "held-out documents (%(val_masked_tokens)d masked tokens):\n"
        "                      masked accuracy   perplexity\n"
        "  encoder             %(masked_accuracy)15.4f %(perplexity)12.1f\n"
        "  most frequent token %(baseline_masked_accuracy)15.4f            -\n"
        "  unigram model                     - %(unigram_perplexity)12.1f",
        figures,
    )
    return figures


if __name__ == "__main__":
    stage_command(pretrain_mlm, name=STAGE)
