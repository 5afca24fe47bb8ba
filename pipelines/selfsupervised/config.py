"""params.yaml section of the masked-language-model stages: `mlm`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from models.transformer import EncoderConfig
from pipelines.stagekit.config import Section, TrainConfig

# A transformer wants AdamW, warm-up then decay, a small decoupled weight decay and more
# epochs than the digits CNN; sized so `dvc repro pretrain_mlm` fits in about ten minutes on
# 2 CPU cores. (A frozen instance is a safe shared default.)
MLM_TRAIN = TrainConfig(
    epochs=40,
    batch_size=16,
    optimizer="adamw",
    lr=0.002,
    lr_schedule="cosine",
    warmup_epochs=2,
    weight_decay=0.01,
    early_stopping_patience=5,
)


@dataclass(frozen=True, repr=False)
class MlmConfig(Section):
    source: str = ""
    """Your corpus: a .txt file, a folder of .txt files (one document each) or a .csv file;
    empty: Python's bundled documentation topics (pydoc_data.topics). Keep it under
    data/sources/ so that editing it re-runs `ingest_corpus`."""
    text_column: str = "text"
    """CSV column holding the text (one document per row)."""
    document_split: Literal["auto", "line", "blank_line"] = "auto"
    """How a .txt file is cut into documents: per line, per blank-line separated paragraph,
    or auto (paragraphs when the file has blank lines)."""
    val_fraction: float = 0.1
    """Share of the words held out for validation, in whole documents."""
    split_seed: int = 0
    """Seed choosing which documents are held out."""
    vocab_size: int = 4096
    """WordPiece vocabulary size, special tokens included (trained on the training split)."""
    lowercase: bool = True
    """Lowercase (and strip accents) before tokenizing."""
    mask_probability: float = 0.15
    """Share of tokens chosen for prediction (80% [MASK], 10% random, 10% unchanged)."""
    model: EncoderConfig = field(default_factory=EncoderConfig)
    """The transformer encoder (max_length also sets the packed block length)."""
    train: TrainConfig = MLM_TRAIN
    """Optimisation and Ray Train settings of the pretraining (`loss` is not used: the loss
    is the cross-entropy at masked positions)."""
    registered_model: str = "dlpipe-mlm"
    """MLflow registry name of the exported encoder."""
    experiment: str = "dlpipe-mlm"
    """MLflow experiment of the pretraining and export runs."""

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must be between 0 and 0.5, got {self.val_fraction}")
        if not 0.0 < self.mask_probability < 1.0:
            raise ValueError(
                f"mask_probability must be between 0 and 1, got {self.mask_probability}"
            )
        if self.vocab_size < 16:
            raise ValueError(f"vocab_size must be >= 16, got {self.vocab_size}")
