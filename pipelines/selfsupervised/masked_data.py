"""The prepared corpus as pretraining and export see it: the masking rule built from the
manifest's vocabulary, the check that the prepared blocks fit the encoder, and the
validation blocks masked once with a fixed seed (so every epoch, and the export's parity
check, score the same positions)."""

from __future__ import annotations

import numpy as np
import torch

from pipelines.selfsupervised.config import MlmConfig
from pipelines.selfsupervised.corpus import TASK
from pipelines.stagekit.dataset import PreparedData
from pipelines.stagekit.errors import UserError
from pipelines.training.masking import MaskingSpec, mask_for_validation


def masking_spec(mlm: MlmConfig, manifest: dict) -> MaskingSpec:
    """The masking rule: reads `mlm.mask_probability`."""
    special = manifest["special_ids"]
    return MaskingSpec(
        vocab_size=manifest["vocab_size"],
        mask_id=special["[MASK]"],
        special_ids=tuple(sorted(special.values())),
        probability=mlm.mask_probability,
    )


def check_prepared(mlm: MlmConfig, data: PreparedData) -> None:
    """The prepared blocks are an MLM corpus as long as the encoder: reads `mlm.model`."""
    if data.manifest.get("task") != TASK:
        raise UserError(f"{data.manifest.get('task')!r} data is not a prepared MLM corpus")
    if data.manifest["block_length"] != mlm.model.max_length:
        raise UserError(
            f"the prepared blocks hold {data.manifest['block_length']} tokens but "
            f"mlm.model.max_length is {mlm.model.max_length}; re-run prepare_mlm"
        )


def validation_arrays(mlm: MlmConfig, data: PreparedData) -> dict[str, np.ndarray]:
    """Training blocks (masked anew every epoch on the workers) and the validation blocks
    masked once, with the fixed seed, as (inputs, targets). Reads `mlm.mask_probability`."""
    spec = masking_spec(mlm, data.manifest)
    x_val, y_val = mask_for_validation(torch.from_numpy(data.x("val")).long(), spec)
    return {"x_train": data.x("train"), "x_val": x_val.numpy(), "y_val": y_val.numpy()}
