"""Stage `ingest_corpus`: copy the pretraining corpus into `data/raw/corpus/` for DVC.

Reads `mlm.source` (default: Python's bundled documentation topics; or your .txt file,
folder of .txt files, or CSV column) and writes it as `documents.jsonl`, one JSON string
per document, so every later stage reads one format and DVC versions exactly what was
trained on. Keep your own corpus under `data/sources/` (a dependency of this stage) so
that editing it re-runs the ingest.
"""

from __future__ import annotations

import json
import logging
from typing import Annotated

from pipelines.selfsupervised.config import MlmConfig
from pipelines.selfsupervised.corpus import BUILTIN_SOURCE, DOCUMENTS_FILE, read_documents
from pipelines.stagekit.atomic import output_directory, write_json
from pipelines.stagekit.config import Param
from pipelines.stagekit.stage import stage_command

log = logging.getLogger(__name__)

SOURCE_FILE = "source.json"


def ingest_corpus(
    mlm: Annotated[MlmConfig, Param("mlm", reads=("source", "text_column", "document_split"))],
    output: str = "data/raw/corpus",
) -> dict:
    documents = read_documents(mlm.source, mlm.text_column, mlm.document_split)
    words = sum(len(d.split()) for d in documents)
    summary = {
        "source": mlm.source or BUILTIN_SOURCE,
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


if __name__ == "__main__":
    stage_command(ingest_corpus)
