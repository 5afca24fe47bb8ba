"""Stage `export_mlm`: the pretrained encoder as two ONNX graphs, parity-checked, registered.

- `model.onnx`: input_ids (batch, sequence) -> logits (batch, sequence, vocabulary), what
  /v1/fill-mask runs;
- `embed.onnx`: input_ids -> sentence_embedding (batch, width), mean-pooled over the
  non-padding tokens and L2-normalized, what /v1/embed runs.

Both axes are dynamic, the sequence up to the encoder's `max_length` (the rotary table's
rows; serving truncates to it). Parity: on the masked validation blocks and on a batch of
variable-length, padded sequences, onnxruntime must match torch within `export.parity_atol`
(logits at the masked positions, embeddings) and agree on every masked position's top
token. The folder (graphs, tokenizer, model card) is registered as `mlm.registered_model`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Annotated

import numpy as np
import torch

from models.losses import IGNORE_INDEX
from models.transformer import MaskedLanguageModel, SentenceEmbedder
from pipelines.selfsupervised.bundle import load_mlm_bundle
from pipelines.selfsupervised.config import MlmConfig
from pipelines.selfsupervised.masked_data import validation_arrays
from pipelines.selfsupervised.tokenizer import TOKENIZER_FILE
from pipelines.stagekit import tracking
from pipelines.stagekit.atomic import output_directory, write_json
from pipelines.stagekit.config import ExportConfig, Param
from pipelines.stagekit.dataset import load_prepared, sha256_file
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.model_bundle import MODEL_FILE
from pipelines.stagekit.onnx_export import (
    PARITY_SAMPLE_FILE,
    PARITY_SAMPLE_SIZE,
    export_onnx,
    onnx_session,
    write_parity_sample,
)
from pipelines.stagekit.quantize import fp32_name, quantize_with_gate, sample_atol
from pipelines.stagekit.stage import stage_command
from serving.contracts import ModelCard
from serving.drift import REFERENCE_FILE, reference_statistics, write_reference

log = logging.getLogger(__name__)

STAGE = "export_mlm"
FILL_MASK_FILE = "model.onnx"
EMBED_FILE = "embed.onnx"
CARD_FILE = "model_card.json"
INPUT = "input_ids"
LOGITS = "logits"
EMBEDDING = "sentence_embedding"  # not "embedding": the exporter names an inner node so

# What export reads of params: the registry name comes from `mlm`, not export.registered_model;
# mask_probability masks the validation blocks of the parity check (and the parity sample) as
# pretraining did. The encoder's shape comes from the trained bundle, not from mlm.model.
REFERENCE_SENTENCES = 2000
"""Training sentences whose embeddings make the drift reference of /v1/embed."""
EXPORT_KEYS = ("opset", "parity_atol", "alias", "quantize", "quantize_max_drop")
MLM_KEYS = ("mask_probability", "registered_model", "experiment")


def parity_inputs(x_val: np.ndarray, y_val: np.ndarray, pad_id: int, seed: int = 0):
    """The masked validation blocks (full length) and the same blocks cut to random lengths
    and padded (what serving sends: short, padded batches)."""
    rng = np.random.default_rng(seed)
    short = x_val[:32, :].copy()
    targets = y_val[:32, :].copy()
    length = max(4, x_val.shape[1] // 2)
    short, targets = short[:, :length], targets[:, :length]
    for row, cut in enumerate(rng.integers(2, length + 1, size=len(short))):
        short[row, cut:] = pad_id
        targets[row, cut:] = IGNORE_INDEX
    return [(x_val, y_val), (short, targets)]


def check_mlm_parity(
    model: MaskedLanguageModel, fill_mask: Path, embed: Path, batches
) -> dict[str, float]:
    logits_session, embed_session = onnx_session(fill_mask), onnx_session(embed)
    logits_diff = embed_diff = 0.0
    agree = scored = 0
    with torch.no_grad():
        for inputs, targets in batches:
            ids = inputs.astype(np.int64)
            masked = targets != IGNORE_INDEX
            expected = model(torch.from_numpy(ids)).numpy()[masked]
            actual = logits_session.run([LOGITS], {INPUT: ids})[0][masked]
            logits_diff = max(logits_diff, float(np.abs(expected - actual).max()))
            agree += int((expected.argmax(-1) == actual.argmax(-1)).sum())
            scored += int(masked.sum())
            vectors = model.embed(torch.from_numpy(ids)).numpy()
            onnx_vectors = embed_session.run([EMBEDDING], {INPUT: ids})[0]
            embed_diff = max(embed_diff, float(np.abs(vectors - onnx_vectors).max()))
    return {
        "onnx_max_abs_diff": logits_diff,
        "onnx_argmax_agreement": agree / max(scored, 1),
        "onnx_embedding_max_abs_diff": embed_diff,
    }


def masked_accuracy(
    fill_mask: Path, inputs: np.ndarray, targets: np.ndarray, batch_size: int = 64
) -> float:
    """Top-1 accuracy at the masked positions of `inputs`, run by onnxruntime (the int8
    gate's score), a batch at a time: the logits of a whole split would take gigabytes."""
    session = onnx_session(fill_mask)
    hits = scored = 0
    for start in range(0, len(inputs), batch_size):
        ids = inputs[start : start + batch_size].astype(np.int64)
        wanted = targets[start : start + batch_size]
        masked = wanted != IGNORE_INDEX
        logits = session.run([LOGITS], {INPUT: ids})[0]
        hits += int((logits[masked].argmax(-1) == wanted[masked]).sum())
        scored += int(masked.sum())
    return hits / max(scored, 1)


def sentences(blocks: np.ndarray, special: set[int], period: int | None) -> list[np.ndarray]:
    """Token blocks as sentence-like pieces (what clients send to /v1/embed): each
    block's tokens, special ones dropped, cut after every period; pieces of 3+ tokens."""
    pieces = []
    for block in blocks:
        tokens = block[~np.isin(block, list(special))]
        cuts = np.flatnonzero(tokens == period) + 1 if period is not None else []
        pieces.extend(piece for piece in np.split(tokens, cuts) if len(piece) >= 3)
    return pieces


def embedding_reference(
    graph: Path,
    pieces: list[np.ndarray],
    special_ids: dict[str, int],
    max_length: int,
    batch: int = 64,
) -> dict:
    """The drift reference of /v1/embed (serving/drift.py): the served graph's embeddings
    of `pieces` and their token counts, wrapped (and cut) as the predictor does a text."""
    session = onnx_session(graph)
    vectors = []
    for start in range(0, len(pieces), batch):
        chunk = [piece[: max_length - 2] for piece in pieces[start : start + batch]]
        ids = np.full((len(chunk), max(map(len, chunk)) + 2), special_ids["[PAD]"], np.int64)
        for row, piece in enumerate(chunk):
            ids[row, : len(piece) + 2] = [special_ids["[CLS]"], *piece, special_ids["[SEP]"]]
        vectors.append(session.run([EMBEDDING], {INPUT: ids})[0])
    lengths = np.array([[len(piece)] for piece in pieces], dtype=np.float64)
    return reference_statistics("text", lengths, ["token_length"], np.concatenate(vectors))


def export_mlm(
    export_config: Annotated[ExportConfig, Param("export", reads=EXPORT_KEYS)],
    mlm: Annotated[MlmConfig, Param("mlm", reads=MLM_KEYS)],
    data_dir: str = "data/prepared/mlm",
    model_dir: str = "artifacts/mlm/model",
    figures_path: str = "metrics/mlm.json",
    output: str = "artifacts/mlm/export",
    metrics_path: str = "metrics/mlm_export.json",
) -> dict:
    data = load_prepared(data_dir)
    model, bundle = load_mlm_bundle(model_dir, data.manifest)
    encoder = model.config  # the trained encoder (pretrain_mlm built it from mlm.model)
    if not Path(figures_path).is_file():
        raise UserError(f"{figures_path}: not found; run pretrain_mlm first")
    figures = json.loads(Path(figures_path).read_text())
    arrays = validation_arrays(mlm, data)
    pad_id = data.manifest["special_ids"]["[PAD]"]
    example = torch.from_numpy(arrays["x_val"][:2, :8].astype(np.int64))
    dynamic = ("batch", "sequence")
    with output_directory(output) as staging:
        export_onnx(
            model,
            example,
            staging / FILL_MASK_FILE,
            export_config.opset,
            input_name=INPUT,
            output_name=LOGITS,
            dynamic_axes=dynamic,
        )
        export_onnx(
            SentenceEmbedder(model),
            example,
            staging / EMBED_FILE,
            export_config.opset,
            input_name=INPUT,
            output_name=EMBEDDING,
            dynamic_axes=dynamic,
        )
        parity = check_mlm_parity(
            model,
            staging / FILL_MASK_FILE,
            staging / EMBED_FILE,
            parity_inputs(arrays["x_val"], arrays["y_val"], pad_id),
        )
        log.info(
            "parity: max |onnx - torch| logits %.2e (top-token agreement %.4f), embeddings %.2e",
            parity["onnx_max_abs_diff"],
            parity["onnx_argmax_agreement"],
            parity["onnx_embedding_max_abs_diff"],
        )
        worst = max(parity["onnx_max_abs_diff"], parity["onnx_embedding_max_abs_diff"])
        if worst > export_config.parity_atol or parity["onnx_argmax_agreement"] < 1.0:
            raise UserError(
                f"ONNX parity check failed: {parity} (export.parity_atol "
                f"{export_config.parity_atol:g}); the previous export is kept"
            )
        gate = None
        if export_config.quantize == "int8":
            gate = quantize_with_gate(
                staging,
                (FILL_MASK_FILE, EMBED_FILE),
                lambda graph: masked_accuracy(graph, arrays["x_val"], arrays["y_val"]),
                "masked_accuracy",
                export_config.quantize_max_drop,
            )
        (staging / TOKENIZER_FILE).write_bytes((Path(model_dir) / TOKENIZER_FILE).read_bytes())
        sample_ids = torch.from_numpy(arrays["x_val"][:PARITY_SAMPLE_SIZE].astype(np.int64))
        with torch.no_grad():
            replay = {
                FILL_MASK_FILE: ({INPUT: sample_ids.numpy()}, {LOGITS: model(sample_ids).numpy()}),
                EMBED_FILE: (
                    {INPUT: sample_ids.numpy()},
                    {EMBEDDING: model.embed(sample_ids).numpy()},
                ),
            }
        atol = export_config.parity_atol
        if gate is not None and gate.kept:
            atol, worst = sample_atol(staging, replay, atol)
            gate = dataclasses.replace(gate, sample_max_abs_diff=worst)
        exported = {**parity, **(gate.figures() if gate is not None else {})}
        sample = write_parity_sample(staging, replay, atol)
        card: ModelCard = {
            "name": mlm.registered_model,
            "task": "masked_lm",
            "architecture": "transformer_encoder",
            "encoder": bundle["encoder"],
            "vocab_size": data.manifest["vocab_size"],
            "special_ids": data.manifest["special_ids"],
            "max_length": encoder.max_length,
            "lowercase": data.manifest["lowercase"],
            "graphs": {
                "fill_mask": {
                    "file": FILL_MASK_FILE,
                    "input": INPUT,
                    "output": LOGITS,
                    "shape": ["batch", "sequence", data.manifest["vocab_size"]],
                },
                "embed": {
                    "file": EMBED_FILE,
                    "input": INPUT,
                    "output": EMBEDDING,
                    "shape": ["batch", encoder.width],
                },
            },
            "tokenizer": TOKENIZER_FILE,
            "parity_sample": sample,
            **(
                {"quantization": gate.card((FILL_MASK_FILE, EMBED_FILE))}
                if gate is not None
                else {}
            ),
            "metrics": {**tracking.without_run_id(figures), **exported},
            "hashes": {
                "onnx_sha256": sha256_file(staging / FILL_MASK_FILE),
                "embed_onnx_sha256": sha256_file(staging / EMBED_FILE),
                "tokenizer_sha256": sha256_file(staging / TOKENIZER_FILE),
                "weights_sha256": sha256_file(Path(model_dir) / MODEL_FILE),
                "data_sha256": data.data_hash,
            },
        }
        from tokenizers import Tokenizer

        period = Tokenizer.from_file(str(staging / TOKENIZER_FILE)).token_to_id(".")
        special = data.manifest["special_ids"]
        pieces = sentences(data.x("train"), set(special.values()), period)
        # A fixed sample is plenty for quintiles and a covariance (all: ~8 s on 2 CPUs).
        keep = np.random.default_rng(0).permutation(len(pieces))[:REFERENCE_SENTENCES]
        pieces = [pieces[i] for i in sorted(keep)]
        reference = embedding_reference(staging / EMBED_FILE, pieces, special, encoder.max_length)
        write_reference(staging, reference)
        card["drift_reference"] = REFERENCE_FILE
        write_json(staging / CARD_FILE, card)
    out = Path(output)
    _, run_id = tracking.register_export(
        STAGE,
        mlm.experiment,
        data.data_hash,
        Path(model_dir) / MODEL_FILE,
        out / FILL_MASK_FILE,
        out / CARD_FILE,
        mlm.registered_model,
        export_config.alias,
        exported,
        extra_files=(
            out / EMBED_FILE,
            out / TOKENIZER_FILE,
            out / PARITY_SAMPLE_FILE,
            out / REFERENCE_FILE,
            *(
                out / fp32_name(graph)
                for graph in (FILL_MASK_FILE, EMBED_FILE)
                if (out / fp32_name(graph)).is_file()
            ),
        ),
    )
    write_json(metrics_path, {**exported, tracking.RUN_ID_KEY: run_id})
    return exported


if __name__ == "__main__":
    stage_command(export_mlm, name=STAGE)
