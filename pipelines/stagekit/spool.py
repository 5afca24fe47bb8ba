"""Tracking records kept on disk while the MLflow server cannot be reached.

One JSON-lines file per MLflow run (`<run_id>.jsonl`), records in the order they were
written; an artifact's file is copied beside them (`<run_id>.files/`) so a later change to
the original cannot alter what is sent. `pipelines/stagekit/tracking.py` decides what goes
here and sends it back (MLflow calls stay in that module); this one only stores.

A stage writes its own runs' files, one process at a time per run (DVC runs one stage of a
repository at a time), so appends need no lock. Lines are appended with one write each;
a line cut short by a killed process is reported and skipped, never guessed at.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pipelines.stagekit import atomic

log = logging.getLogger(__name__)

SPOOL_ENV = "DLPIPE_TRACKING_SPOOL"
DEFAULT_DIR = Path(".dlpipe") / "tracking-spool"


def spool_dir() -> str:
    """`DLPIPE_TRACKING_SPOOL`, or `.dlpipe/tracking-spool` in the repository, absolute."""
    return str(Path(os.environ.get(SPOOL_ENV) or DEFAULT_DIR).resolve())


class Spool:
    """The records waiting to be sent, under `directory`."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def _file(self, run_id: str) -> Path:
        return self.directory / f"{run_id}.jsonl"

    def runs(self) -> list[str]:
        """Ids of the runs with records waiting, oldest file first."""
        if not self.directory.is_dir():
            return []
        files = sorted(self.directory.glob("*.jsonl"), key=lambda f: f.stat().st_mtime)
        return [f.stem for f in files]

    def has(self, run_id: str) -> bool:
        return self._file(run_id).exists()

    def append(self, run_id: str, record: dict[str, Any], attach: str | Path | None = None) -> None:
        """Keep `record` for run `run_id`; `attach`: a file to copy in (its copy's path is
        stored as the record's "file")."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if attach is not None:
            files = self.directory / f"{run_id}.files"
            files.mkdir(exist_ok=True)
            # A folder per file: MLflow names the artifact after the file.
            folder = files / f"{len(list(files.iterdir())):04d}"
            folder.mkdir()
            copy = folder / Path(attach).name
            shutil.copyfile(attach, copy)
            record = {**record, "file": str(copy)}
        line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
        fd = os.open(self._file(run_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def records(self, run_id: str) -> list[dict[str, Any]]:
        path = self._file(run_id)
        if not path.exists():
            return []
        records = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s:%d: a record cut short (process killed?): skipped", path, number)
        return records

    def keep_only(self, run_id: str, records: list[dict[str, Any]]) -> None:
        """Replace run `run_id`'s records with `records` (the ones not sent yet); none left:
        its files go."""
        if records:
            atomic.write_text(
                self._file(run_id), "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
            )
            return
        self._file(run_id).unlink(missing_ok=True)
        shutil.rmtree(self.directory / f"{run_id}.files", ignore_errors=True)

    def set_aside(self, run_id: str, record: dict[str, Any], reason: str) -> Path:
        """A record the server refused (e.g. its run was deleted): kept, with the reason, in
        `rejected.jsonl` for a person to look at; never sent again."""
        path = self.directory / "rejected.jsonl"
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"run_id": run_id, "reason": reason, **record}) + "\n")
        return path
