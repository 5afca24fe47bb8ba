"""Stage `export_segment`: each segmentation model as one ONNX graph, parity-checked.

`kmeans.onnx` (transform -> nearest centroid) and `autoencoder.onnx` (transform ->
encoder -> nearest centroid) take the raw feature values (batch, features) and return
`segment` (int64) and `distances` to every centroid. Parity: on every customer, the
graph's segment ids equal the torch path's and its distances match within
`export.parity_atol`. The graph named by `segment.serve` (or `--serve`) is registered as
`segment.registered_model`, with the model card (feature names, segment names and
profiles) and the other graph beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from models.autoencoder import Autoencoder, AutoencoderConfig
from models.segmenter import Segmenter
from pipelines import tracking
from pipelines.atomic import output_directory, write_json
from pipelines.config import PipelineConfig, load_config
from pipelines.customer_features import FeatureTransform
from pipelines.dataset import sha256_file
from pipelines.errors import UserError
from pipelines.onnx_export import (
    PARITY_SAMPLE_FILE,
    PARITY_SAMPLE_SIZE,
    export_onnx,
    onnx_session,
    write_parity_sample,
)
from pipelines.segment import MODEL_FILE, feature_table, table_hash
from pipelines.stage import run_stage

log = logging.getLogger(__name__)

STAGE = "export_segment"
CARD_FILE = "model_card.json"
INPUT = "features"
OUTPUTS = ("segment", "distances")
GRAPHS = ("kmeans", "autoencoder")


def segmenters(bundle: dict) -> dict[str, Segmenter]:
    transform = FeatureTransform.from_dict(bundle["transform"])
    logs = [c in transform.log_columns for c in transform.columns]
    config = AutoencoderConfig(
        **{k: tuple(v) if isinstance(v, list) else v for k, v in bundle["autoencoder"].items()}
    )
    autoencoder = Autoencoder(config, len(transform.columns))
    autoencoder.load_state_dict(bundle["autoencoder_state"])
    return {
        "kmeans": Segmenter(logs, transform.mean, transform.std, bundle["kmeans_centroids"]),
        "autoencoder": Segmenter(
            logs, transform.mean, transform.std, bundle["code_centroids"], autoencoder.encoder
        ),
    }


def check_segment_parity(model: Segmenter, path: Path, raw: np.ndarray) -> dict:
    with torch.no_grad():
        ids, distances = (t.numpy() for t in model.eval()(torch.from_numpy(raw)))
    onnx_ids, onnx_distances = onnx_session(path).run(list(OUTPUTS), {INPUT: raw})
    return {
        "max_abs_diff": float(np.abs(distances - onnx_distances).max()),
        "segment_agreement": float(np.mean(ids == onnx_ids)),
    }


def export_segment(
    config: PipelineConfig,
    data_dir: str,
    model_dir: str,
    figures_path: str,
    output: str,
    metrics_path: str,
    serve: str | None = None,
) -> dict:
    serve = serve or config.segment.serve
    if serve not in GRAPHS:
        raise UserError(f"--serve must be one of {', '.join(GRAPHS)}, got {serve!r}")
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
                config.export.opset,
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
                parity[name]["max_abs_diff"] > config.export.parity_atol
                or parity[name]["segment_agreement"] < 1.0
            ):
                raise UserError(
                    f"ONNX parity check failed for {name}: {parity[name]}; previous export kept"
                )
        (staging / "model.onnx").write_bytes((staging / f"{serve}.onnx").read_bytes())
        sample_rows = raw[:PARITY_SAMPLE_SIZE]
        with torch.no_grad():
            ids, distances = segmenters(bundle)[serve].eval()(torch.from_numpy(sample_rows))
        sample = write_parity_sample(
            staging,
            {
                "model.onnx": (
                    {INPUT: sample_rows},
                    dict(zip(OUTPUTS, (ids.numpy(), distances.numpy()))),
                )
            },
            config.export.parity_atol,
        )
        card = {
            "name": config.segment.registered_model,
            "task": "segmentation",
            "model": serve,
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
                "segment": "int64 (batch,)",
                "distances": f"float32 (batch, {bundle['k']})",
            },
            "k": int(bundle["k"]),
            "segments": profiles[serve],
            "transform": bundle["transform"],
            "parity_sample": sample,
            "metrics": {
                **{k: v for k, v in figures.items() if isinstance(v, (int, float))},
                **{f"onnx_{g}_max_abs_diff": p["max_abs_diff"] for g, p in parity.items()},
            },
            "hashes": {"onnx_sha256": sha256_file(staging / "model.onnx")},
        }
        write_json(staging / CARD_FILE, card)
    metrics = {f"{g}_{k}": v for g, p in parity.items() for k, v in p.items()}
    write_json(metrics_path, metrics)
    out = Path(output)
    log.info("registering the %s graph", serve)
    tracking.register_export(
        STAGE,
        config.segment.experiment,
        table_hash(table),
        path,
        out / "model.onnx",
        out / CARD_FILE,
        config.segment.registered_model,
        config.export.alias,
        metrics,
        extra_files=(*(out / f"{g}.onnx" for g in GRAPHS), out / PARITY_SAMPLE_FILE),
    )
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/raw/customers")
    parser.add_argument("--model", default="artifacts/segment/model")
    parser.add_argument("--figures", default="metrics/segment.json")
    parser.add_argument("--output", default="artifacts/segment/export")
    parser.add_argument("--metrics", default="metrics/segment_export.json")
    parser.add_argument(
        "--serve", help="graph to register, kmeans or autoencoder (default: segment.serve)"
    )
    args = parser.parse_args(argv)
    run_stage(
        STAGE,
        lambda: export_segment(
            load_config(args.params),
            args.data,
            args.model,
            args.figures,
            args.output,
            args.metrics,
            args.serve,
        ),
    )


if __name__ == "__main__":
    main()
