"""Stage `export`: ONNX model + parity check + model card + MLflow Model Registry.

The parity check runs the whole test split through torch and onnxruntime; if they differ
by more than `export.parity_atol` (or disagree on any predicted class) the stage fails and
no new model is written or registered. Writes `metrics/supervised.json`, the headline
figures of the supervised pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

from pipelines.stagekit import tracking
from pipelines.stagekit.atomic import output_directory, write_json
from pipelines.stagekit.config import ExportConfig, Param
from pipelines.stagekit.dataset import PreparedData, array_file, load_prepared, sha256_file
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.model_bundle import MODEL_FILE, inference_model, load_trained
from pipelines.stagekit.onnx_export import (
    INPUT_NAME,
    OUTPUT_NAME,
    PARITY_SAMPLE_FILE,
    PARITY_SAMPLE_SIZE,
    Parity,
    check_parity,
    export_onnx,
    onnx_session,
    write_parity_sample,
)
from pipelines.stagekit.quantize import fp32_name, quantize_with_gate, sample_atol
from pipelines.stagekit.sequences import sequence_lengths
from pipelines.stagekit.stage import stage_command
from serving.contracts import ModelCard
from serving.drift import (
    REFERENCE_FILE,
    feature_names,
    feature_rows,
    layout_of,
    reference_statistics,
    write_reference,
)

log = logging.getLogger(__name__)

STAGE = "export"
ONNX_FILE = "model.onnx"
CARD_FILE = "model_card.json"
# What export reads of the `export` section; the registered name comes from the command line.
EXPORT_KEYS = ("opset", "parity_atol", "alias", "quantize", "quantize_max_drop")
HEADLINE = (
    *(
        f"{name}{part}"
        for name in ("test_accuracy", "test_macro_f1")
        for part in ("", "_ci95_low", "_ci95_high")
    ),
    "test_accuracy_examples",
    "test_rmse",
    "test_mae",
    "test_r2",
)


def model_card(
    registered_model: str,
    architecture: str,
    manifest: dict,
    evaluation: dict,
    parity: Parity,
    hashes: dict,
) -> ModelCard:
    """What a client or reviewer needs to use the model correctly, in one JSON file. The
    same model gives the same bytes: the run, commit and time that made it are on its
    registered version in MLflow, not here (DVC hashes this file)."""
    classification = manifest["task"] == "classification"
    shape = ["batch", *manifest["input_shape"]]
    if manifest["input_kind"] == "sequence":  # any length up to max_length
        shape[1] = "time"
    return {
        "name": registered_model,
        "task": manifest["task"],
        "architecture": architecture,
        "input": {
            "name": INPUT_NAME,
            "shape": shape,
            "dtype": "float32",
            "kind": manifest["input_kind"],
            "feature_names": manifest["feature_names"],
        },
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", len(manifest["class_names"]) if classification else 1],
            "meaning": "class probabilities (softmax)" if classification else "predicted value",
        },
        "class_names": manifest["class_names"],
        "preprocessing": {
            **manifest["preprocessing"],
            "normalization": "inside the graph (mean/std of the training split)",
        },
        "metrics": {
            **tracking.without_run_id(evaluation),
            "onnx_max_abs_diff": parity.max_abs_diff,
            "onnx_argmax_agreement": parity.argmax_agreement,
        },
        "hashes": hashes,
    }


def shorter_half(x: np.ndarray) -> np.ndarray:
    """The shorter half of NaN-padded sequences (N, T, C), cut to their own longest length."""
    lengths = sequence_lengths(x)
    short = x[lengths <= np.median(lengths)]
    return short[:, : sequence_lengths(short).max()]


def training_inputs(data: PreparedData) -> list[np.ndarray]:
    """What the model learnt from: the train split, or a semi-supervised one's labeled and
    unlabeled pools (pipelines/semisupervised/prepare.py); kept apart, as series are
    padded to each array's own length."""
    splits = ("train", "labeled", "unlabeled")
    return [data.x(s) for s in splits if array_file("x", s) in data.arrays]


def onnx_accuracy(graph: Path, inputs: np.ndarray, labels: np.ndarray) -> float:
    """The graph's accuracy on `inputs`, run by onnxruntime (the int8 gate's score)."""
    probabilities = onnx_session(graph).run([OUTPUT_NAME], {INPUT_NAME: inputs})[0]
    return float(np.mean(probabilities.argmax(axis=1) == labels))


def export(
    export_config: Annotated[ExportConfig, Param("export", reads=EXPORT_KEYS)],
    registered_model: str,
    experiment: str,
    data_dir: str = "data/prepared/supervised",
    model_dir: str = "artifacts/supervised/model",
    evaluation_path: str = "metrics/evaluate.json",
    output: str = "artifacts/supervised/export",
    metrics_path: str = "metrics/supervised.json",
) -> dict:
    """Export, check and register the trained model as `registered_model`, logged to the
    training run's `experiment` (dvc.yaml passes export.registered_model and
    tracking.experiment, or the pseudo-label student's names: the same code serves both)."""
    data = load_prepared(data_dir)
    model, bundle = load_trained(model_dir, data.manifest)
    if not Path(evaluation_path).is_file():
        raise UserError(f"{evaluation_path}: not found; run the evaluate stage first")
    evaluation = json.loads(Path(evaluation_path).read_text())
    servable = inference_model(model, data.task)
    x_test = data.x("test")
    sequences = data.manifest["input_kind"] == "sequence"
    if export_config.quantize != "none" and data.task != "classification":
        raise UserError(
            f"export.quantize {export_config.quantize}: the gate compares validation accuracy, "
            f"which a {data.task} model has not; set export.quantize: none"
        )
    with output_directory(output) as staging:
        onnx_path = staging / ONNX_FILE
        export_onnx(
            servable,
            torch.from_numpy(x_test[:2]),
            onnx_path,
            export_config.opset,
            dynamic_axes=("batch", "time") if sequences else ("batch",),
        )
        parity = check_parity(servable, onnx_path, x_test)
        if sequences:
            # The test split is padded to its longest series; a batch of the shorter half,
            # cut to their own longest, checks the graph at another length too.
            parity = parity.merge(check_parity(servable, onnx_path, shorter_half(x_test)))
        log.info(
            "parity on %d test examples: max |onnx - torch| = %.2e, argmax agreement %.4f",
            parity.examples,
            parity.max_abs_diff,
            parity.argmax_agreement,
        )
        if not parity.holds(export_config.parity_atol, data.task == "classification"):
            raise UserError(
                f"ONNX parity check failed: max |onnxruntime - torch| = {parity.max_abs_diff:.3g} "
                f"(export.parity_atol {export_config.parity_atol:g}), argmax agreement "
                f"{parity.argmax_agreement:.4f}; the previous export is kept"
            )
        gate = None
        if export_config.quantize == "int8":
            # Chosen on the validation split: the test split's figures stay unselected.
            x_val, y_val = data.x("val"), data.y("val")
            gate = quantize_with_gate(
                staging,
                (ONNX_FILE,),
                lambda graph: onnx_accuracy(graph, x_val, y_val),
                "val_accuracy",
                export_config.quantize_max_drop,
            )
        # What a replica re-checks before serving: for sequences, a length other than the
        # one the graph was exported at, so the check covers the free time axis too.
        replayed = (shorter_half(x_test) if sequences else x_test)[:PARITY_SAMPLE_SIZE]
        with torch.no_grad():
            expected = servable(torch.from_numpy(replayed)).numpy()
        replay = {ONNX_FILE: ({INPUT_NAME: replayed}, {OUTPUT_NAME: expected})}
        atol = export_config.parity_atol
        if gate is not None and gate.kept:
            atol, worst = sample_atol(staging, replay, atol)
            gate = dataclasses.replace(gate, sample_max_abs_diff=worst)
        sample = write_parity_sample(staging, replay, atol)
        hashes = {
            "onnx_sha256": sha256_file(onnx_path),
            "weights_sha256": sha256_file(Path(model_dir) / MODEL_FILE),
            "data_sha256": data.data_hash,
        }
        card = model_card(
            registered_model,
            bundle["architecture"]["kind"],
            data.manifest,
            evaluation,
            parity,
            hashes,
        )
        card["parity_sample"] = sample
        if gate is not None:
            card["quantization"] = gate.card((ONNX_FILE,))
        # What serving compares live inputs with (serving/drift.py): the training split.
        layout = layout_of(data.manifest["input_kind"])
        names = feature_names(layout, data.manifest["input_shape"], data.manifest["feature_names"])
        rows = np.concatenate([feature_rows(layout, x) for x in training_inputs(data)])
        write_reference(staging, reference_statistics(layout, rows, names))
        card["drift_reference"] = REFERENCE_FILE
        write_json(staging / CARD_FILE, card)

    figures = {k: evaluation[k] for k in HEADLINE if k in evaluation}
    figures.update(
        onnx_max_abs_diff=parity.max_abs_diff, onnx_argmax_agreement=parity.argmax_agreement
    )
    if gate is not None:
        figures.update(gate.figures())
    out = Path(output)
    kept_fp32 = out / fp32_name(ONNX_FILE)
    _, run_id = tracking.register_export(
        STAGE,
        experiment,
        data.data_hash,
        Path(model_dir) / MODEL_FILE,
        out / ONNX_FILE,
        out / CARD_FILE,
        registered_model,
        export_config.alias,
        figures,
        extra_files=(
            out / PARITY_SAMPLE_FILE,
            out / REFERENCE_FILE,
            *([kept_fp32] if kept_fp32.is_file() else []),
        ),
    )
    write_json(metrics_path, {**figures, tracking.RUN_ID_KEY: run_id})
    return figures


if __name__ == "__main__":
    stage_command(export, name=STAGE)
