"""Reading corpora, whole-document splits, the tokenizer, packing and the baselines."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from models.losses import IGNORE_INDEX
from pipelines.selfsupervised.corpus import builtin_documents, read_documents, split_documents
from pipelines.selfsupervised.figures import baseline_figures, token_counts
from pipelines.selfsupervised.prepare import split_documents as split_train_val
from pipelines.selfsupervised.tokenizer import (
    SPECIAL_TOKENS,
    learn_vocabulary,
    pack_blocks,
    special_ids,
    train_wordpiece,
)
from pipelines.stagekit.errors import UserError


def test_builtin_corpus_is_pythons_documentation_without_layout_lines():
    documents = builtin_documents()
    assert len(documents) > 50
    assert sum(len(d.split()) for d in documents) > 50_000
    lines = "\n".join(documents).splitlines()
    rules = [line for line in lines if re.fullmatch(r"\s*[-+=*]{3,}[-+=* ]*", line)]
    assert not rules, rules[:3]  # table borders and heading underlines are gone
    assert any('The "assert" statement' in d for d in documents)


def test_text_file_folder_and_csv_sources(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("first document\nsecond document\n\n")
    assert read_documents(str(lines)) == ["first document", "second document"]
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("one\nstill one\n\n  \ntwo\n")
    assert read_documents(str(paragraphs)) == ["one\nstill one", "two"]
    assert read_documents(str(paragraphs), split="line") == ["one", "still one", "two"]
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha")
    (folder / "sub" / "b.txt").write_text("beta\n\ngamma")
    (folder / "ignored.md").write_text("not text")
    assert read_documents(str(folder)) == ["alpha", "beta\n\ngamma"]
    table = tmp_path / "t.csv"
    table.write_text('id,body\n1,"hello, world"\n2,second\n')
    assert read_documents(str(table), text_column="body") == ["hello, world", "second"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p / "missing.txt", "corpus not found"),
        (lambda p: (p / "bad.txt").write_bytes(b"fine\ncaf\xe9\n") and p / "bad.txt", "line 2"),
        (lambda p: (p / "t.csv").write_text("a,b\n1,2\n") and p / "t.csv", "no column 'text'"),
        (lambda p: (p / "empty.txt").write_text("\n\n") and p / "empty.txt", "no text"),
        (lambda p: (p / "d").mkdir() or p / "d", "no .txt files"),
    ],
)
def test_bad_sources_name_the_problem(tmp_path, setup, message):
    with pytest.raises(UserError, match=message):
        read_documents(str(setup(tmp_path)))


def test_validation_takes_whole_documents():
    documents = [" ".join(["w"] * n) for n in (100, 5, 50, 30, 80, 10, 60, 20)]
    train, val = split_train_val(documents, 0.2, seed=0)
    assert sorted(train + val) == list(range(len(documents)))
    assert not set(train) & set(val)
    held = sum(len(documents[i].split()) for i in val)
    assert held >= 0.2 * 355
    with pytest.raises(UserError, match="at least 2"):
        split_train_val(["only one"], 0.1, seed=0)


def test_tokenizer_keeps_special_tokens_and_recognises_mask_in_text():
    texts = split_documents("\n".join(builtin_documents()[:10]), "blank_line")
    tokenizer = train_wordpiece(texts, vocab_size=500, lowercase=True)
    ids = special_ids(tokenizer)
    assert ids == {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    encoded = tokenizer.encode("The [MASK] Statement", add_special_tokens=False)
    assert encoded.tokens[1] == "[MASK]" and encoded.tokens[0] == "the"


def test_tokenizer_merges_the_most_frequent_pair_first_ties_alphabetically():
    counts = Counter({"ce": 3, "ab": 5, "cd": 3})
    vocabulary = learn_vocabulary(counts, vocab_size=len(SPECIAL_TOKENS) + 5 + 2)
    assert vocabulary[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert vocabulary[len(SPECIAL_TOKENS) : -2] == ["##b", "##d", "##e", "a", "c"]
    # (a, ##b) occurs 5 times; (c, ##d) and (c, ##e) tie at 3: the alphabetical first wins.
    assert vocabulary[-2:] == ["ab", "cd"]


def test_tokenizer_training_gives_the_same_file_in_every_process():
    """`tokenizers`' own trainer numbered pieces in a per-process hash order: two runs on the
    same text learned different vocabularies. Two fresh interpreters must agree here."""
    script = (
        "from pipelines.selfsupervised.corpus import builtin_documents\n"
        "from pipelines.selfsupervised.tokenizer import train_wordpiece\n"
        "print(train_wordpiece(builtin_documents()[:20], 800, True).to_str())"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(2)
    }
    assert len(outputs) == 1


def test_packing_fills_blocks_and_pads_only_the_last():
    blocks, padding = pack_blocks([[5, 6, 7], [8, 9]], block_length=4, cls_id=2, sep_id=3, pad_id=0)
    assert blocks.tolist() == [[2, 5, 6, 7], [2, 3, 8, 9], [2, 3, 0, 0]]
    assert padding == 2


def test_baselines_on_masked_positions():
    train = np.array([[2, 5, 5, 5, 6, 3]])
    counts = token_counts(train, vocab_size=8, special_ids=[0, 1, 2, 3, 4])
    targets = np.array([[IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7]])
    figures = baseline_figures(counts, targets, [0, 1, 2, 3, 4])
    assert figures["baseline_masked_accuracy"] == pytest.approx(1 / 3)
    # add-one smoothing over the 3 regular tokens: p(5)=4/7, p(6)=2/7, p(7)=1/7
    expected = math.exp(-np.mean(np.log([4 / 7, 2 / 7, 1 / 7])))
    assert figures["unigram_perplexity"] == pytest.approx(expected)
    assert figures["val_masked_tokens"] == 3
