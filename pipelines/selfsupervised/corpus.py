"""Text corpora for masked-language-model pretraining: reading users' files and the default.

A corpus is a list of documents (strings). Sources:
- "" (the default): the documentation topics that ship with Python (`pydoc_data.topics`,
  about 65K words of English), one document per topic;
- a `.txt` file: one document per line, or per blank-line separated paragraph;
- a folder: every `.txt` file below it is one document;
- a `.csv` file: one document per row, from `text_column`.

Errors name the file (and line, row or column); nothing is written here.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Literal

from pipelines.stagekit.errors import UserError

DocumentSplit = Literal["auto", "line", "blank_line"]

BUILTIN_SOURCE = "pydoc_data.topics"

# reST layout in the built-in topics: grid-table borders (+-----+----+), heading underlines
# (*****, =====) and rules. They are drawing, not language: left in, a run of "-" tokens
# would be the most common "word" and predicting it would pass for understanding.
_LAYOUT_LINE = re.compile(r"(?m)^[ \t]*[-+=*~^#|_:.]{3,}[-+=*~^#|_:. \t]*$\n?")


def builtin_documents() -> list[str]:
    """Python's own documentation topics, one document per topic, sorted by topic name."""
    from pydoc_data.topics import topics

    return [_LAYOUT_LINE.sub("", topics[name]).strip() for name in sorted(topics)]


def read_documents(
    source: str, text_column: str = "text", split: DocumentSplit = "auto"
) -> list[str]:
    """The non-empty documents of `source` (see the module docstring)."""
    if not source:
        return builtin_documents()
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise UserError(f"{path}: folder has no .txt files")
        documents = [_read_text(file).strip() for file in files]
    elif path.is_file() and path.suffix.lower() == ".csv":
        documents = _read_csv_column(path, text_column)
    elif path.is_file():
        documents = split_documents(_read_text(path), split)
    else:
        raise UserError(f"{path}: corpus not found (a .txt file, a folder of .txt files or a .csv)")
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise UserError(f"{path}: no text found")
    return documents


def split_documents(text: str, split: DocumentSplit = "auto") -> list[str]:
    """One document per blank-line separated paragraph, or per line. `auto`: paragraphs when
    the text has blank lines, else lines."""
    if split == "auto":
        split = "blank_line" if re.search(r"\n[ \t]*\n", text.strip()) else "line"
    pieces = re.split(r"\n[ \t]*\n", text) if split == "blank_line" else text.splitlines()
    return [p.strip() for p in pieces if p.strip()]


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(
            f"{path}: not UTF-8 text (invalid byte 0x{data[exc.start]:02x} on line {line}); "
            "convert it, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def _read_csv_column(path: Path, column: str) -> list[str]:
    text = _read_text(path)
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None:
        raise UserError(f"{path}: empty CSV file")
    if column not in reader.fieldnames:
        raise UserError(
            f"{path}: no column {column!r} (set mlm.text_column); columns: "
            f"{', '.join(reader.fieldnames)}"
        )
    try:
        return [row[column] or "" for row in reader]
    except csv.Error as exc:
        raise UserError(f"{path}: line {reader.line_num}: {exc}") from None


TASK = "masked_lm"
"""The `task` in the manifest of a corpus that `prepare_mlm` tokenized and packed."""

DOCUMENTS_FILE = "documents.jsonl"
"""What `ingest_corpus` writes: one JSON string (a document) per line."""


def read_ingested(directory: str) -> list[str]:
    """The documents written by `ingest_corpus`."""
    path = Path(directory) / DOCUMENTS_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; run the ingest_corpus stage first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
