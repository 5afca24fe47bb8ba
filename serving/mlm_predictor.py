"""ONNX Runtime masked-language model: fill-mask and sentence embeddings.

No Ray here. Texts are tokenized in-process with the tokenizer saved at training time
(`tokenizer.json`), wrapped in [CLS] ... [SEP] like the packed training blocks, padded to
the longest text of the batch, and run through the exported graphs. Client mistakes
(empty text, no [MASK], too long) raise `InputError` naming the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.contracts import card_info, read_card
from serving.model_source import ModelFiles
from serving.predictor import InputError
from serving.runtime import ort_session

MASK_TOKEN = "[MASK]"
SPACE = "\t\n\v\f\r \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
"""White space as JSON Schema's regular expressions (ECMA-262 `\\s`) know it: a text is
empty when it has nothing else. Python's str.isspace() counts more (e.g. \\x1c), so the
OpenAPI document's pattern and this check would disagree about such a text."""
NOT_EMPTY = f"[^{SPACE}]"
"""The pattern of a text that is not empty (serving/kinds.py puts it in the document)."""


@dataclass(frozen=True)
class Encoded:
    ids: np.ndarray
    """int64 (batch, longest) token ids, [PAD]-padded."""
    truncated: list[bool]
    lengths: np.ndarray
    """(batch,) each text's token count before [CLS], [SEP] and any cut."""


class MaskedLmPredictor:
    def __init__(self, files: ModelFiles, threads: int = 1, use_gpu: bool | None = None) -> None:
        from tokenizers import Tokenizer

        self.files = files
        self.card = read_card(files, "masked_lm", "a masked-language model")
        graphs = self.card["graphs"]
        self.tokenizer = Tokenizer.from_file(str(files.sibling(self.card["tokenizer"])))
        self.fill_mask_session = ort_session(files.onnx, threads, use_gpu)
        self.embed_session = ort_session(files.sibling(graphs["embed"]["file"]), threads, use_gpu)
        special = self.card["special_ids"]
        self.cls_id, self.sep_id = special["[CLS]"], special["[SEP]"]
        self.pad_id, self.mask_id = special["[PAD]"], special["[MASK]"]
        self.special = set(special.values())
        self.max_length: int = self.card["max_length"]

    def info(self) -> dict[str, Any]:
        return {
            **card_info(self.files, self.card, self.fill_mask_session),
            "max_length": self.max_length,
            "vocab_size": self.card["vocab_size"],
            "embedding_size": self.card["graphs"]["embed"]["shape"][1],
        }

    def encode(self, texts: list[str], field: str, truncate: bool) -> Encoded:
        """[CLS] tokens [SEP] per text, padded; over-long texts are cut (truncate) or refused."""
        rows, truncated, lengths = [], [], []
        for i, text in enumerate(texts):
            if not re.search(NOT_EMPTY, text):
                raise InputError(f"{field}[{i}]", "text is empty")
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            limit = self.max_length - 2
            if len(ids) > limit and not truncate:
                raise InputError(
                    f"{field}[{i}]",
                    f"text is {len(ids)} tokens long; this model reads at most {limit} "
                    f"(max_length {self.max_length} with [CLS] and [SEP])",
                )
            truncated.append(len(ids) > limit)
            lengths.append(len(ids))
            rows.append([self.cls_id, *ids[:limit], self.sep_id])
        longest = max(len(r) for r in rows)
        batch = np.full((len(rows), longest), self.pad_id, dtype=np.int64)
        for row, ids in enumerate(rows):
            batch[row, : len(ids)] = ids
        return Encoded(batch, truncated, np.asarray(lengths))

    def fill_mask(self, texts: list[str], top_k: int = 5) -> list[dict[str, Any]]:
        """For every [MASK] in every text, the `top_k` likeliest tokens with probabilities."""
        for i, text in enumerate(texts):
            if re.search(NOT_EMPTY, text) and MASK_TOKEN not in text:
                raise InputError(f"texts[{i}]", f"text has no {MASK_TOKEN} token to fill")
        encoded = self.encode(texts, "texts", truncate=False)
        logits = self.fill_mask_session.run(None, {"input_ids": encoded.ids})[0]  # (B, T, V)
        # Special tokens are never answers ([MASK] for [MASK] would say nothing).
        logits[..., sorted(self.special)] = -np.inf
        results = []
        for row, text in enumerate(texts):
            masks = []
            for position in np.flatnonzero(encoded.ids[row] == self.mask_id):
                probabilities = _softmax(logits[row, position])
                best = np.argsort(-probabilities)[:top_k]
                masks.append(
                    {
                        "position": int(position),
                        "predictions": [
                            {
                                "token": self.tokenizer.id_to_token(int(t)),
                                "token_id": int(t),
                                "score": float(probabilities[t]),
                            }
                            for t in best
                        ],
                    }
                )
            results.append({"text": text, "masks": masks})
        return results

    def embed(self, texts: list[str]) -> tuple[np.ndarray, list[bool], np.ndarray]:
        """(len(texts), width) unit vectors, which texts were cut to max_length tokens, and
        each text's token count (serving/drift.py watches it)."""
        encoded = self.encode(texts, "texts", truncate=True)
        vectors = self.embed_session.run(None, {"input_ids": encoded.ids})[0]
        return vectors, encoded.truncated, encoded.lengths

    def embed_many(
        self, requests: list[list[str]]
    ) -> list[tuple[np.ndarray, list[bool], np.ndarray] | InputError]:
        """Several requests' texts in one onnxruntime call (dynamic batching), padded to the
        longest (the graph ignores padding); each request gets its own `embed` answer, or
        the InputError that only it caused."""
        results: list[Any] = [None] * len(requests)
        encoded: dict[int, Encoded] = {}
        for index, texts in enumerate(requests):
            try:
                encoded[index] = self.encode(texts, "texts", truncate=True)
            except InputError as exc:
                results[index] = exc
        if encoded:
            longest = max(e.ids.shape[1] for e in encoded.values())
            rows = sum(len(e.ids) for e in encoded.values())
            ids = np.full((rows, longest), self.pad_id, np.int64)
            start = 0
            for e in encoded.values():
                ids[start : start + len(e.ids), : e.ids.shape[1]] = e.ids
                start += len(e.ids)
            vectors = self.embed_session.run(None, {"input_ids": ids})[0]
            start = 0
            for index, e in encoded.items():
                results[index] = (vectors[start : start + len(e.ids)], e.truncated, e.lengths)
                start += len(e.ids)
        return results


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()
