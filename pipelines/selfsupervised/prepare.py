"""Stage `prepare_mlm`: split the corpus by whole documents, train the WordPiece tokenizer
on the training documents, and pack both splits into fixed-length token blocks.

Writes `data/prepared/mlm/`: `tokenizer.json`, `x_train.npy` / `x_val.npy` (int32 token
blocks, (N, mlm.model.max_length)) and `manifest.json` (special token ids, sizes, the
padding share, every array's sha256), read back through `pipelines.stagekit.dataset.load_prepared`.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Annotated

import numpy as np

from pipelines.selfsupervised.config import MlmConfig
from pipelines.selfsupervised.corpus import TASK, read_ingested
from pipelines.selfsupervised.tokenizer import (
    TOKENIZER_FILE,
    pack_blocks,
    special_ids,
    train_wordpiece,
)
from pipelines.stagekit.atomic import output_directory, write_json
from pipelines.stagekit.config import Param
from pipelines.stagekit.dataset import MANIFEST, array_file, sha256_file
from pipelines.stagekit.errors import UserError
from pipelines.stagekit.stage import stage_command

log = logging.getLogger(__name__)


def split_documents(
    documents: Sequence[str], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train, val) document indices: documents drawn in a seeded order go to validation
    until it holds `val_fraction` of the words. Whole documents only, so no sentence is
    half-seen in training."""
    if len(documents) < 2:
        raise UserError(
            f"the corpus has {len(documents)} document(s); at least 2 are needed to hold "
            "whole documents out for validation (check mlm.document_split)"
        )
    words = [len(d.split()) for d in documents]
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    target = val_fraction * sum(words)
    val: list[int] = []
    held = 0
    for index in order[:-1]:  # at least one document stays for training
        if held >= target:
            break
        val.append(index)
        held += words[index]
    val_set = set(val)
    return [i for i in range(len(documents)) if i not in val_set], sorted(val)


# `model` is read whole: only its max_length (the block length) is used, but an EncoderConfig
# is not a params Section, so it cannot be narrowed to that key.
PREPARE_KEYS = ("val_fraction", "split_seed", "vocab_size", "lowercase", "model")


def prepare_mlm(
    mlm: Annotated[MlmConfig, Param("mlm", reads=PREPARE_KEYS)],
    corpus_dir: str = "data/raw/corpus",
    output: str = "data/prepared/mlm",
) -> dict:
    documents = read_ingested(corpus_dir)
    train_idx, val_idx = split_documents(documents, mlm.val_fraction, mlm.split_seed)
    train_texts = [documents[i] for i in train_idx]
    tokenizer = train_wordpiece(train_texts, mlm.vocab_size, mlm.lowercase)
    special = special_ids(tokenizer)
    block_length = mlm.model.max_length
    manifest: dict = {
        "format_version": 1,
        "task": TASK,
        "vocab_size": tokenizer.get_vocab_size(),
        "special_ids": special,
        "block_length": block_length,
        "lowercase": mlm.lowercase,
        "source": {
            "path": corpus_dir,
            "val_fraction": mlm.val_fraction,
            "seed": mlm.split_seed,
        },
        "splits": {},
        "arrays": {},
    }
    with output_directory(output) as staging:
        tokenizer.save(str(staging / TOKENIZER_FILE))
        for split, indices in (("train", train_idx), ("val", val_idx)):
            encoded = tokenizer.encode_batch(
                [documents[i] for i in indices], add_special_tokens=False
            )
            blocks, padding = pack_blocks(
                [e.ids for e in encoded],
                block_length,
                special["[CLS]"],
                special["[SEP]"],
                special["[PAD]"],
            )
            name = array_file("x", split)
            np.save(staging / name, blocks, allow_pickle=False)
            manifest["arrays"][name] = {
                "sha256": sha256_file(staging / name),
                "shape": list(blocks.shape),
                "dtype": str(blocks.dtype),
            }
            tokens = sum(len(e.ids) for e in encoded)
            manifest["splits"][split] = {
                "documents": len(indices),
                "tokens": tokens,
                "blocks": len(blocks),
                "padding_fraction": round(padding / blocks.size, 4),
                "unknown_fraction": round(
                    sum(e.ids.count(special["[UNK]"]) for e in encoded) / max(tokens, 1), 4
                ),
            }
        manifest["tokenizer_sha256"] = sha256_file(staging / TOKENIZER_FILE)
        write_json(staging / MANIFEST, manifest)
    splits = manifest["splits"]
    log.info(
        "vocabulary %d; train %d documents -> %d tokens in %d blocks of %d; "
        "validation %d documents -> %d tokens (padding %.1f%% / %.1f%%)",
        manifest["vocab_size"],
        splits["train"]["documents"],
        splits["train"]["tokens"],
        splits["train"]["blocks"],
        block_length,
        splits["val"]["documents"],
        splits["val"]["tokens"],
        100 * splits["train"]["padding_fraction"],
        100 * splits["val"]["padding_fraction"],
    )
    return manifest


if __name__ == "__main__":
    stage_command(prepare_mlm)
