"""Tracking records kept on disk while the MLflow server cannot be reached.

One JSON-lines file per MLflow run (`<run_id>.jsonl`), records in the order they were
written; an artifact's file is copied beside them (`<run_id>.files/`) so a later change to
the original cannot alter what is sent. `pipelines/stagekit/tracking.py` decides what goes
here and sends it back (MLflow calls stay in that module); this one only stores.

A stage appends to its own runs' files while `dlpipe tracking sync` or the next stage may
replay them: appends and replays take the spool's lock (`lock`), so a record appended
during a replay is neither lost nor sent twice. A line cut short by a killed process is
reported and skipped, never guessed at. Records the server refused go to `rejected/`,
for a person to look at; nothing there is sent again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterator
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
        self._held = False

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
        with self.lock():
            fd = os.open(self._file(run_id), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                with os.fdopen(fd, "wb", closefd=False) as handle:
                    handle.write(line)  # the whole line (os.write may write part of it)
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
        """A record the server refused (e.g. its run was deleted): kept, with the reason and
        its file, under `rejected/` for a person to look at; never sent again."""
        rejected = self.directory / "rejected"
        rejected.mkdir(mode=0o700, exist_ok=True)
        if record.get("file") and Path(record["file"]).exists():
            moved = rejected / f"{run_id}-{Path(record['file']).parent.name}"
            shutil.move(Path(record["file"]).parent, moved)
            record = {**record, "file": str(moved / Path(record["file"]).name)}
        path = rejected / "records.jsonl"
        line = json.dumps({"run_id": run_id, "reason": reason, **record}) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as handle:
            handle.write(line)
        return path

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The spool's lock, across processes (re-entrant within one: held by a thread
        that replays, then appends)."""
        if self._held:
            yield
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._held = True
            try:
                yield
            finally:
                self._held = False
                fcntl.flock(handle, fcntl.LOCK_UN)
