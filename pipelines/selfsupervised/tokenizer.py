"""The WordPiece tokenizer of the masked-language model, trained on the training split.

Saved as one `tokenizer.json` (the `tokenizers` library's format) that travels with the
model to serving, where the replica tokenizes requests exactly as training did.

The vocabulary is learned here, not by `tokenizers.trainers.WordPieceTrainer`: that trainer
numbers the `##` continuation pieces in hash-map order, which changes from process to
process, and breaks ties between equally frequent pairs by those numbers, so two runs on
the same text learned different vocabularies (10 of 4,096 pieces and 338 ids differed on
the built-in corpus) and `dvc repro` could not reproduce `prepare_mlm`. The algorithm is the
same (merge the most frequent adjacent pair of pieces until the vocabulary is full); ties
go to the alphabetically first pair, so the same text always gives the same vocabulary.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

TOKENIZER_FILE = "tokenizer.json"
"""The tokenizer's file name, in the prepared corpus, the model folder and the export."""

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""First in the vocabulary, so they get ids 0..4 in this order."""

CONTINUATION = "##"
"""Marks a piece that continues a word (BERT's convention)."""


def _pipeline(lowercase: bool):
    """The normalizer and pre-tokenizer that training and every later encode share."""
    from tokenizers import normalizers, pre_tokenizers

    return (
        normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase),
        pre_tokenizers.BertPreTokenizer(),
    )


def word_counts(texts: Iterable[str], lowercase: bool) -> Counter[str]:
    """How often each pre-tokenized word (BERT's split on spaces and punctuation) occurs."""
    normalizer, pre_tokenizer = _pipeline(lowercase)
    counts: Counter[str] = Counter()
    for text in texts:
        words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
        counts.update(word for word, _ in words)
    return counts


def learn_vocabulary(counts: Counter[str], vocab_size: int) -> list[str]:
    """Special tokens, the alphabet (each character alone and as a continuation), then
    pieces merged from the most frequent adjacent pair, until `vocab_size` pieces or no pair
    is left. Deterministic: words are visited in sorted order and ties between pairs of the
    same count go to the alphabetically first pair."""
    words = sorted(counts)
    # Each word as its current pieces: "the" -> ["t", "##h", "##e"].
    pieces = [[w[0], *(CONTINUATION + c for c in w[1:])] for w in words]
    frequency = [counts[w] for w in words]
    vocabulary = list(SPECIAL_TOKENS)
    alphabet = sorted({piece for word in pieces for piece in word})
    vocabulary += [p for p in alphabet if p not in SPECIAL_TOKENS]
    known = set(vocabulary)

    pair_count: Counter[tuple[str, str]] = Counter()
    holders: dict[tuple[str, str], set[int]] = {}  # pair -> indices of words containing it
    for index, word in enumerate(pieces):
        for pair in zip(word, word[1:]):
            pair_count[pair] += frequency[index]
            holders.setdefault(pair, set()).add(index)
    # A max-heap by count, then pair; entries go stale as counts change and are re-checked.
    heap = [(-count, pair) for pair, count in pair_count.items()]
    heapq.heapify(heap)

    while len(vocabulary) < vocab_size and heap:
        negative, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -negative or -negative <= 0:
            continue  # stale entry: the pair's current count was pushed separately
        first, second = pair
        merged = first + second.removeprefix(CONTINUATION)
        if merged not in known:
            vocabulary.append(merged)
            known.add(merged)
        changed: set[tuple[str, str]] = set()
        for index in sorted(holders.pop(pair, ())):
            word, weight = pieces[index], frequency[index]
            for old in zip(word, word[1:]):
                pair_count[old] -= weight
                changed.add(old)
            word = _merge(word, first, second, merged)
            pieces[index] = word
            for new in zip(word, word[1:]):
                pair_count[new] += weight
                holders.setdefault(new, set()).add(index)
                changed.add(new)
        pair_count.pop(pair, None)
        for other in sorted(changed):
            count = pair_count.get(other, 0)
            if count > 0:
                heapq.heappush(heap, (-count, other))
            else:
                pair_count.pop(other, None)
    return vocabulary


def _merge(word: list[str], first: str, second: str, merged: str) -> list[str]:
    """`word` with every adjacent (first, second), left to right, replaced by `merged`."""
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def train_wordpiece(texts: Sequence[str], vocab_size: int, lowercase: bool):
    """A BERT-style WordPiece tokenizer (`tokenizers.Tokenizer`) learned from `texts`."""
    from tokenizers import Tokenizer, decoders, models

    vocabulary = learn_vocabulary(word_counts(texts, lowercase), vocab_size)
    tokenizer = Tokenizer(
        models.WordPiece(
            {piece: i for i, piece in enumerate(vocabulary)},
            unk_token="[UNK]",
            continuing_subword_prefix=CONTINUATION,
        )
    )
    tokenizer.normalizer, tokenizer.pre_tokenizer = _pipeline(lowercase)
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION)
    # Whole tokens wherever they appear in text ("the [MASK] is"), never split by the
    # pre-tokenizer; they keep their ids 0..4.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
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
