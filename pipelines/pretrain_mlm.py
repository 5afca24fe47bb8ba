"""Stage `pretrain_mlm`: masked-language-model pretraining of the transformer encoder on
Ray Train, tracked in MLflow, with its held-out figures beside two baselines.

Reads the packed token blocks and tokenizer from `prepare_mlm` and params `mlm`; writes the
model folder (weights, config, tokenizer), `metrics/mlm.json` and the learning curves.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch

from pipelines import tracking
from pipelines.atomic import output_directory, write_json
from pipelines.config import MlmConfig, config_to_dict, load_config
from pipelines.dataset import PreparedData, load_prepared
from pipelines.errors import UserError
from pipelines.mlm_bundle import build_mlm, save_mlm_bundle
from pipelines.mlm_metrics import baseline_figures, model_figures, token_counts
from pipelines.model_bundle import MODEL_FILE
from pipelines.plots import learning_curves_png, write_csv
from pipelines.prepare_mlm import TASK, TOKENIZER_FILE
from pipelines.stage import run_stage
from pipelines.training.driver import RunDiverged, finished_run, loop_config, run_name, run_training
from pipelines.training.loop import without_timings
from pipelines.training.masking import MaskingSpec, mask_for_validation
from pipelines.training.tasks import MaskedLmTask
from pipelines.training.worker import train_loop_per_worker

log = logging.getLogger(__name__)

STAGE = "pretrain_mlm"
CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "train_accuracy", "val_accuracy")


def masking_spec(config: MlmConfig, manifest: dict) -> MaskingSpec:
    special = manifest["special_ids"]
    return MaskingSpec(
        vocab_size=manifest["vocab_size"],
        mask_id=special["[MASK]"],
        special_ids=tuple(sorted(special.values())),
        probability=config.mask_probability,
    )


def check_prepared(config: MlmConfig, data: PreparedData) -> None:
    if data.manifest.get("task") != TASK:
        raise UserError(f"{data.manifest.get('task')!r} data is not a prepared MLM corpus")
    if data.manifest["block_length"] != config.model.max_length:
        raise UserError(
            f"the prepared blocks hold {data.manifest['block_length']} tokens but "
            f"mlm.model.max_length is {config.model.max_length}; re-run prepare_mlm"
        )


def validation_arrays(config: MlmConfig, data: PreparedData) -> dict[str, np.ndarray]:
    """Training blocks (masked anew every epoch on the workers) and the validation blocks
    masked once, with the fixed seed, as (inputs, targets)."""
    spec = masking_spec(config, data.manifest)
    x_val, y_val = mask_for_validation(torch.from_numpy(data.x("val")).long(), spec)
    return {"x_train": data.x("train"), "x_val": x_val.numpy(), "y_val": y_val.numpy()}


def pretrain_mlm(
    config: MlmConfig, data_dir: str, output: str, metrics_path: str, plots_dir: str
) -> dict:
    data = load_prepared(data_dir)
    check_prepared(config, data)
    manifest = data.manifest
    arrays = validation_arrays(config, data)
    special = sorted(manifest["special_ids"].values())
    baselines = baseline_figures(
        token_counts(data.x("train"), manifest["vocab_size"], special), arrays["y_val"], special
    )
    task = MaskedLmTask(
        config.model, masking_spec(config, manifest), manifest["special_ids"]["[PAD]"]
    )
    name = run_name(
        STAGE,
        config_to_dict(config.model),
        config_to_dict(config.train),
        config.mask_probability,
        data.data_hash,
    )
    with tracking.stage_run(
        config.experiment, STAGE, tracking.stage_tags(STAGE, data.data_hash)
    ) as run:
        run.log_params(
            {
                "model": config_to_dict(config.model),
                "train": config_to_dict(config.train),
                "mask_probability": config.mask_probability,
                "vocab_size": manifest["vocab_size"],
                "train_tokens": manifest["splits"]["train"]["tokens"],
                "train_blocks": manifest["splits"]["train"]["blocks"],
                "val_masked_tokens": baselines["val_masked_tokens"],
            }
        )
        log.info(
            "pretraining a %d-layer encoder (width %d) on %d blocks of %d tokens, %d worker(s): "
            "ray run %s, mlflow run %s",
            config.model.layers,
            config.model.width,
            manifest["splits"]["train"]["blocks"],
            config.model.max_length,
            config.train.num_workers,
            name,
            run.run_id,
        )
        result = run_training(
            train_loop_per_worker, loop_config(arrays, task, config.train, run), config.train, name
        )
        try:
            state = finished_run(result, name).state
        except RunDiverged:
            run.set_tags({"diverged": "true"})
            raise
        history = state["history"]
        if state["best_model"] is None:
            raise UserError(
                f"no usable epoch: validation loss never finite (mlm.train.lr {config.train.lr:g})"
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
        model = build_mlm(config.model, manifest)
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
        write_json(metrics_path, figures)
        run.log_metrics({k: float(v) for k, v in figures.items()})
        run.log_artifact(Path(output) / "learning_curves.png", "plots")
    log.info(
        "held-out documents (%d masked tokens):\n"
        "                      masked accuracy   perplexity\n"
        "  encoder             %15.4f %12.1f\n"
        "  most frequent token %15.4f            -\n"
        "  unigram model                     - %12.1f",
        figures["val_masked_tokens"],
        figures["masked_accuracy"],
        figures["perplexity"],
        figures["baseline_masked_accuracy"],
        figures["unigram_perplexity"],
    )
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared/mlm")
    parser.add_argument("--output", default="artifacts/mlm/model")
    parser.add_argument("--metrics", default="metrics/mlm.json")
    parser.add_argument("--plots", default="plots/mlm")
    args = parser.parse_args(argv)
    run_stage(
        STAGE,
        lambda: pretrain_mlm(
            load_config(args.params).mlm, args.data, args.output, args.metrics, args.plots
        ),
    )


if __name__ == "__main__":
    main()
