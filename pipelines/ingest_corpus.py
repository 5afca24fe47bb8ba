"""Stage `ingest_corpus`: copy the pretraining corpus into `data/raw/corpus/` for DVC.

Reads `mlm.source` (default: Python's bundled documentation topics; or your .txt file,
folder of .txt files, or CSV column) and writes it as `documents.jsonl`, one JSON string
per document, so every later stage reads one format and DVC versions exactly what was
trained on. Keep your own corpus under `data/sources/` (a dependency of this stage) so
that editing it re-runs the ingest.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipelines.atomic import output_directory, write_json
from pipelines.config import MlmConfig, load_config
from pipelines.corpus import BUILTIN_SOURCE, read_documents
from pipelines.errors import UserError
from pipelines.stage import run_stage

log = logging.getLogger(__name__)

DOCUMENTS_FILE = "documents.jsonl"
SOURCE_FILE = "source.json"


def ingest_corpus(config: MlmConfig, output: str) -> dict:
    documents = read_documents(config.source, config.text_column, config.document_split)
    words = sum(len(d.split()) for d in documents)
    summary = {
        "source": config.source or BUILTIN_SOURCE,
        "documents": len(documents),
        "words": words,
    }
    with output_directory(output) as staging:
        lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in documents)
        (staging / DOCUMENTS_FILE).write_text(lines, encoding="utf-8")
        write_json(staging / SOURCE_FILE, summary)
    log.info(
        "corpus %s: %d documents, %d words -> %s", summary["source"], len(documents), words, output
    )
    return summary


def read_ingested(directory: str) -> list[str]:
    """The documents written by `ingest_corpus`."""
    path = Path(directory) / DOCUMENTS_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; run the ingest_corpus stage first")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--output", default="data/raw/corpus")
    args = parser.parse_args(argv)
    run_stage("ingest_corpus", lambda: ingest_corpus(load_config(args.params).mlm, args.output))


if __name__ == "__main__":
    main()
