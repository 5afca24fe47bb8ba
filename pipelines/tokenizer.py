"""The WordPiece tokenizer of the masked-language model, trained on the training split.

Saved as one `tokenizer.json` (the `tokenizers` library's format) that travels with the
model to serving, where the replica tokenizes requests exactly as training did.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""Trained first, so they get ids 0..4 in this order."""


def train_wordpiece(texts: Sequence[str], vocab_size: int, lowercase: bool):
    """A BERT-style WordPiece tokenizer (`tokenizers.Tokenizer`) learned from `texts`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def special_ids(tokenizer) -> dict[str, int]:
    """{"[PAD]": 0, ...}: the id of every special token in `tokenizer`."""
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    missing = [token for token, i in ids.items() if i is None]
    if missing:
        raise ValueError(f"tokenizer lacks special tokens {missing}")
    return ids


def pack_blocks(
    documents: Sequence[Sequence[int]], block_length: int, cls_id: int, sep_id: int, pad_id: int
) -> tuple[np.ndarray, int]:
    """Sequence packing: the documents' tokens joined into one stream (each document ends
    with [SEP]) and cut into blocks of `block_length`, each starting with [CLS]. Only the
    last block is padded, so almost no compute goes to padding (documents of a few tokens
    would otherwise be mostly [PAD]). Returns (blocks int32 (N, block_length), pad count)."""
    stream = np.fromiter(
        (token for document in documents for token in (*document, sep_id)), dtype=np.int32
    )
    per_block = block_length - 1  # after [CLS]
    count = max(1, -(-len(stream) // per_block))
    blocks = np.full((count, block_length), pad_id, dtype=np.int32)
    blocks[:, 0] = cls_id
    padded = np.full(count * per_block, pad_id, dtype=np.int32)
    padded[: len(stream)] = stream
    blocks[:, 1:] = padded.reshape(count, per_block)
    return blocks, int(count * per_block - len(stream))
