"""Stage `export_segment`: each segmentation model as one ONNX graph, parity-checked.

`kmeans.onnx` (transform -> nearest centroid), `autoencoder.onnx` (transform -> encoder
-> nearest centroid) and `model.onnx`, the served segmentation (`segment.method` in the
`segment.reduce` space: for DBSCAN, the nearest kept core point within eps, else noise,
segment -1), take the raw feature values (batch, features) and return `segment` (int64)
and `distances` to every segment. Parity: on every customer, the graph's segment ids
equal the torch path's and its distances match within `export.parity_atol`. `model.onnx`
is registered as `segment.registered_model`, with the model card (feature names, segment
names and profiles) and the other graphs beside it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

from models.segmenter import Segmenter
from pipelines.stagekit import tracking
from pipelines.stagekit.atomic import output_directory, write_json
from pipelines.stagekit.config import ExportConfig, Param
from pipelines.stagekit.dataset import sha256_file
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.onnx_export import (
    PARITY_SAMPLE_FILE,
    PARITY_SAMPLE_SIZE,
    export_onnx,
    onnx_session,
    write_parity_sample,
)
from pipelines.stagekit.stage import stage_command
from pipelines.unsupervised.config import SegmentConfig
from pipelines.unsupervised.segment_model import MODEL_FILE, feature_table, segmenters, table_hash
from serving.contracts import ModelCard
from serving.drift import REFERENCE_FILE, reference_statistics, write_reference

log = logging.getLogger(__name__)

STAGE = "export_segment"
CARD_FILE = "model_card.json"
INPUT = "features"
OUTPUTS = ("segment", "distances")
GRAPHS = ("kmeans", "autoencoder")
"""The graphs beside the served one, for comparison."""
SERVED = "model"
# What export_segment reads of the `export` section (the registered name is the segment's own)
# and of the `segment` section.
EXPORT_KEYS = ("opset", "parity_atol", "alias")
SEGMENT_KEYS = ("registered_model", "experiment")


def check_segment_parity(model: Segmenter, path: Path, raw: np.ndarray) -> dict:
    with torch.no_grad():
        ids, distances = (t.numpy() for t in model.eval()(torch.from_numpy(raw)))
    onnx_ids, onnx_distances = onnx_session(path).run(list(OUTPUTS), {INPUT: raw})
    return {
        "max_abs_diff": float(np.abs(distances - onnx_distances).max()),
        "segment_agreement": float(np.mean(ids == onnx_ids)),
    }


def export_segment(
    export_config: Annotated[ExportConfig, Param("export", reads=EXPORT_KEYS)],
    segment: Annotated[SegmentConfig, Param("segment", reads=SEGMENT_KEYS)],
    data_dir: str = "data/raw/customers",
    model_dir: str = "artifacts/segment/model",
    figures_path: str = "metrics/segment.json",
    output: str = "artifacts/segment/export",
    metrics_path: str = "metrics/segment_export.json",
) -> dict:
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; run the segment stage first")
    bundle = torch.load(path, map_location="cpu", weights_only=True)
    profiles = json.loads((Path(model_dir) / "profiles.json").read_text())
    figures = json.loads(Path(figures_path).read_text())
    table = feature_table(data_dir)
    columns = bundle["transform"]["columns"]
    raw = table[columns].to_numpy(dtype=np.float32)
    parity: dict[str, dict] = {}
    with output_directory(output) as staging:
        for name, model in segmenters(bundle).items():
            graph = staging / f"{name}.onnx"
            export_onnx(
                model,
                torch.from_numpy(raw[:2]),
                graph,
                export_config.opset,
                input_name=INPUT,
                output_name=OUTPUTS,
            )
            parity[name] = check_segment_parity(model, graph, raw)
            log.info(
                "%s graph parity on %d customers: max |distance diff| %.2e, segment agreement %.4f",
                name,
                len(raw),
                parity[name]["max_abs_diff"],
                parity[name]["segment_agreement"],
            )
            if (
                parity[name]["max_abs_diff"] > export_config.parity_atol
                or parity[name]["segment_agreement"] < 1.0
            ):
                raise UserError(
                    f"ONNX parity check failed for {name}: {parity[name]}; previous export kept"
                )
        sample_rows = raw[:PARITY_SAMPLE_SIZE]
        served = bundle["model"]
        with torch.no_grad():
            ids, distances = segmenters(bundle)[SERVED].eval()(torch.from_numpy(sample_rows))
        sample = write_parity_sample(
            staging,
            {
                "model.onnx": (
                    {INPUT: sample_rows},
                    dict(zip(OUTPUTS, (ids.numpy(), distances.numpy()))),
                )
            },
            export_config.parity_atol,
        )
        card: ModelCard = {
            "name": segment.registered_model,
            "task": "segmentation",
            "model": f"{served['method']} on {served['reduce']}",
            "input": {
                "name": INPUT,
                "shape": ["batch", len(columns)],
                "dtype": "float32",
                "feature_names": columns,
                # Counts, days and amounts: a negative value is a client mistake.
                "non_negative": [c for c in columns if table[c].min() >= 0],
            },
            "output": {
                "names": list(OUTPUTS),
                "segment": "int64 (batch,), -1: noise",
                "distances": f"float32 (batch, {distances.shape[1]})",
            },
            "k": int(distances.shape[1]),
            "segments": profiles[SERVED],
            "transform": bundle["transform"],
            "parity_sample": sample,
            "metrics": {
                **{k: v for k, v in figures.items() if isinstance(v, (int, float))},
                **{
                    f"model_{k}": v
                    for k, v in figures["model"].items()
                    if isinstance(v, (int, float))
                },
                **{f"onnx_{g}_max_abs_diff": p["max_abs_diff"] for g, p in parity.items()},
            },
            "hashes": {"onnx_sha256": sha256_file(staging / "model.onnx")},
            # The customers it was fitted on, to compare live requests with (serving/drift.py).
            "drift_reference": REFERENCE_FILE,
        }
        write_reference(staging, reference_statistics("values", raw, columns))
        write_json(staging / CARD_FILE, card)
    metrics = {f"{g}_{k}": v for g, p in parity.items() for k, v in p.items()}
    out = Path(output)
    log.info("registering the served graph (%s on %s)", served["method"], served["reduce"])
    _, run_id = tracking.register_export(
        STAGE,
        segment.experiment,
        table_hash(table),
        path,
        out / "model.onnx",
        out / CARD_FILE,
        segment.registered_model,
        export_config.alias,
        metrics,
        extra_files=(
            *(out / f"{g}.onnx" for g in GRAPHS),
            out / PARITY_SAMPLE_FILE,
            out / REFERENCE_FILE,
        ),
    )
    write_json(metrics_path, {**metrics, tracking.RUN_ID_KEY: run_id})
    return metrics


if __name__ == "__main__":
    stage_command(export_segment, name=STAGE)
