"""The pretrained masked-language model on disk: weights, encoder config and tokenizer.

Same contract as `model_bundle.py`: `model.pt` holds only tensors and plain data
(`torch.load(weights_only=True)`), and the network is rebuilt from its config. The
tokenizer is copied next to it, so the folder is everything export and serving need.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path
from typing import Any

import torch

from models.transformer import EncoderConfig, MaskedLanguageModel
from pipelines.selfsupervised.tokenizer import TOKENIZER_FILE
from pipelines.stagekit.atomic import write_bytes
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.model_bundle import MODEL_FILE


def save_mlm_bundle(
    directory: str | Path,
    model: MaskedLanguageModel,
    manifest: dict[str, Any],
    tokenizer_path: str | Path,
    extra: dict[str, Any] | None = None,
) -> None:
    buffer = io.BytesIO()
    torch.save(
        {
            "encoder": dataclasses.asdict(model.config),
            "manifest": manifest,
            "state_dict": model.state_dict(),
            "extra": extra or {},
        },
        buffer,
    )
    write_bytes(Path(directory) / MODEL_FILE, buffer.getvalue())
    shutil.copyfile(tokenizer_path, Path(directory) / TOKENIZER_FILE)


def build_mlm(encoder: EncoderConfig, manifest: dict[str, Any]) -> MaskedLanguageModel:
    """The untrained network for the vocabulary described by `manifest`."""
    return MaskedLanguageModel(encoder, manifest["vocab_size"], manifest["special_ids"]["[PAD]"])


def load_mlm_bundle(
    directory: str | Path, manifest: dict[str, Any] | None = None
) -> tuple[MaskedLanguageModel, dict[str, Any]]:
    """(model in eval mode, bundle metadata); with `manifest`, the model must have been
    trained on that prepared data."""
    directory = Path(directory)
    for name in (MODEL_FILE, TOKENIZER_FILE):
        if not (directory / name).is_file():
            raise UserError(f"{directory / name}: not found; run pretrain_mlm first")
    bundle = torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
    if manifest is not None and bundle["manifest"] != manifest:
        raise UserError(
            f"{directory}: the model was trained on other prepared data; re-run pretrain_mlm"
        )
    model = build_mlm(EncoderConfig(**bundle["encoder"]), bundle["manifest"])
    model.load_state_dict(bundle["state_dict"])
    return model.eval(), bundle
