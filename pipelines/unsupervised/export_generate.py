"""Stage `export_generate`: each generator (VAE decoder, GAN generator) as one ONNX graph,
parity-checked, and the `generate.serve` one registered for /v1/generate.

A graph maps `latent` (batch, latent) to `images` (batch, C, H, W) in [0, 1]. Parity:
on 512 seeded standard-normal latents (the distribution serving draws from) every pixel of
onnxruntime's images is within `export.parity_atol` of torch's; a graph that fails is not
registered and the previous export stays. The card carries the sample-quality figures of
`metrics/generate.json`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

from pipelines.stagekit import tracking
from pipelines.stagekit.atomic import output_directory, write_json
from pipelines.stagekit.config import ExportConfig, Param
from pipelines.stagekit.dataset import load_prepared, sha256_file
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.onnx_export import (
    PARITY_SAMPLE_FILE,
    PARITY_SAMPLE_SIZE,
    export_onnx,
    onnx_session,
    write_parity_sample,
)
from pipelines.stagekit.stage import stage_command
from pipelines.unsupervised.config import GenerateConfig
from pipelines.unsupervised.generator_model import KINDS, MODEL_FILE, Sampler, load_generator
from serving.contracts import ModelCard
from serving.generate_predictor import INPUT, OUTPUT, latents

log = logging.getLogger(__name__)

STAGE = "export_generate"
CARD_FILE = "model_card.json"
PARITY_LATENTS = 512
QUALITY_KEYS = ("fid", "mean_confidence", "class_entropy", "epochs_run")
EXPORT_KEYS = ("opset", "parity_atol", "alias")
GENERATE_KEYS = ("serve", "registered_model", "experiment")


def torch_images(sampler: Sampler, z: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return sampler.eval()(torch.from_numpy(z)).numpy()


def write_export(
    samplers: dict[str, Sampler],
    serve: str,
    directory: Path,
    export_config: ExportConfig,
    registered_model: str,
    figures: dict[str, float],
) -> dict[str, float]:
    """Each sampler as `<kind>.onnx` in `directory`, parity-checked; the `serve` one also as
    `model.onnx` with its parity sample and model card (carrying `figures`). Returns each
    graph's max |pixel diff|; raises UserError when one is above `parity_atol`."""
    parity: dict[str, float] = {}
    for kind, sampler in samplers.items():
        size = sampler.model.config.latent
        graph = directory / f"{kind}.onnx"
        export_onnx(
            sampler.export_form(),
            torch.zeros(2, size),
            graph,
            export_config.opset,
            input_name=INPUT,
            output_name=OUTPUT,
        )
        z = latents(0, PARITY_LATENTS, size)
        (onnx_images,) = onnx_session(graph).run([OUTPUT], {INPUT: z})
        parity[kind] = float(np.abs(onnx_images - torch_images(sampler, z)).max())
        log.info(
            "%s generator parity on %d latents: max |pixel diff| %.2e",
            kind,
            PARITY_LATENTS,
            parity[kind],
        )
        if parity[kind] > export_config.parity_atol:
            raise UserError(
                f"ONNX parity check failed for the {kind} generator: max |diff| "
                f"{parity[kind]:.3g} > export.parity_atol {export_config.parity_atol:g}; "
                "previous export kept"
            )
    (directory / "model.onnx").write_bytes((directory / f"{serve}.onnx").read_bytes())
    served = samplers[serve]
    size = served.model.config.latent
    z = latents(1, PARITY_SAMPLE_SIZE, size)
    sample = write_parity_sample(
        directory,
        {"model.onnx": ({INPUT: z}, {OUTPUT: torch_images(served, z)})},
        export_config.parity_atol,
    )
    card: ModelCard = {
        "name": registered_model,
        "task": "generation",
        "model": serve,
        "conditional": False,
        "input": {"name": INPUT, "shape": ["batch", size], "dtype": "float32"},
        "output": {
            "name": OUTPUT,
            "shape": ["batch", *served.model.image_shape],
            "range": [0.0, 1.0],
        },
        "parity_sample": sample,
        "metrics": {
            # The quality figures, not the wall-clock ones: a re-export writes the same card.
            **{k: v for k, v in figures.items() if k in QUALITY_KEYS},
            **{f"onnx_{kind}_max_abs_diff": diff for kind, diff in parity.items()},
        },
        "hashes": {"onnx_sha256": sha256_file(directory / "model.onnx")},
    }
    write_json(directory / CARD_FILE, card)
    return parity


def export_generate(
    export_config: Annotated[ExportConfig, Param("export", reads=EXPORT_KEYS)],
    config: Annotated[GenerateConfig, Param("generate", reads=GENERATE_KEYS)],
    models_dir: str = "artifacts/generate/models",
    figures_path: str = "metrics/generate.json",
    data_dir: str = "data/prepared/supervised",
    output: str = "artifacts/generate/export",
    metrics_path: str = "metrics/generate_export.json",
) -> dict:
    figures = json.loads(Path(figures_path).read_text())
    data_hash = load_prepared(data_dir).data_hash
    samplers = {kind: Sampler(load_generator(Path(models_dir) / kind)[0]) for kind in KINDS}
    with output_directory(output) as staging:
        parity = write_export(
            samplers,
            config.serve,
            staging,
            export_config,
            config.registered_model,
            figures[config.serve],
        )
    metrics = {f"{kind}_max_abs_diff": diff for kind, diff in parity.items()}
    out = Path(output)
    log.info("registering the %s generator", config.serve)
    _, run_id = tracking.register_export(
        STAGE,
        config.experiment,
        data_hash,
        Path(models_dir) / config.serve / MODEL_FILE,
        out / "model.onnx",
        out / CARD_FILE,
        config.registered_model,
        export_config.alias,
        metrics,
        extra_files=(*(out / f"{kind}.onnx" for kind in KINDS), out / PARITY_SAMPLE_FILE),
    )
    write_json(metrics_path, {**metrics, tracking.RUN_ID_KEY: run_id})
    return metrics


if __name__ == "__main__":
    stage_command(export_generate, name=STAGE)
