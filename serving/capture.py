"""Request capture: a sampled share of the requests and their answers, written off the
request path to rotating JSON-lines files, for drift reports and for training on what
production sees (`dlpipe capture export`). Set live through `user_config.capture`:

    capture:
      rate: 0.01              # the share of requests kept (0: off)
      directory: captures     # on a cluster: a path every replica's node shares
      max_queue: 10000        # records waiting for the writer; beyond, dropped and counted
      rotate_rows: 10000      # records per file

A request only pays a random draw and, when sampled, a put on a bounded queue; a thread of
the replica writes. A full queue drops the record (counted); a write that fails (disk
full, directory gone) is counted and logged once, and serving goes on. Each record:
request id, time, route, model, version, the request's JSON body and the answer.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from serving.live_settings import over_defaults

log = logging.getLogger(__name__)

_STOP = object()


class CaptureConfigError(ValueError):
    """A `capture` setting that cannot be used; the message names the setting."""


@dataclass(frozen=True)
class CaptureConfig:
    rate: float = 0.0
    directory: str = "captures"
    max_queue: int = 10_000
    rotate_rows: int = 10_000

    @classmethod
    def parse(cls, raw: Any) -> CaptureConfig:
        values = over_defaults("capture", raw, cls(), CaptureConfigError)
        rate = values["rate"]
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise CaptureConfigError(f"capture.rate: expected a number from 0 to 1, got {rate!r}")
        for key in ("max_queue", "rotate_rows"):
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CaptureConfigError(
                    f"capture.{key}: expected a whole number >= 1, got {value!r}"
                )
        if not isinstance(values["directory"], str) or not values["directory"]:
            raise CaptureConfigError("capture.directory: name a directory")
        return cls(float(rate), values["directory"], values["max_queue"], values["rotate_rows"])


class RequestCapture:
    """The writer of one replica; `offer` is what the request path calls."""

    def __init__(self, config: CaptureConfig, replica: str = "local") -> None:
        self.config = config
        self.directory = Path(config.directory).expanduser().resolve()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe = self.directory / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise CaptureConfigError(
                f"capture.directory: cannot write {self.directory} ({exc.strerror or exc})"
            ) from None
        self.replica = "".join(c if c.isalnum() else "-" for c in replica)[:40]
        self.queue: queue.Queue = queue.Queue(maxsize=config.max_queue)
        self.captured = self.dropped = self.failed = self.written = self.files = 0
        self._file: Any = None
        self._rows = 0
        self._warned = False
        self._thread = threading.Thread(target=self._drain, name="dlpipe-capture", daemon=True)
        self._thread.start()

    def offer(self, route: str, body: bytes, answer: dict[str, Any]) -> None:
        """Keep this request with `config.rate` probability (never blocks, never raises)."""
        if self.config.rate <= 0 or random.random() >= self.config.rate:
            return
        record = {
            "request_id": uuid.uuid4().hex,
            "time": time.time(),
            "route": route,
            "model": answer.get("model"),
            "version": answer.get("version"),
            "body": body,
            "answer": answer,
        }
        try:
            self.queue.put_nowait(record)
            self.captured += 1
        except queue.Full:
            self.dropped += 1

    def status(self) -> dict[str, Any]:
        return {
            **asdict(self.config),
            "directory": str(self.directory),
            "captured": self.captured,
            "dropped": self.dropped,
            "failed": self.failed,
            "written": self.written,
            "files": self.files,
        }

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (up to `timeout_s`), then stop the writer."""
        try:
            self.queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)

    def _drain(self) -> None:
        while (record := self.queue.get()) is not _STOP:
            try:
                self._write(record)
            except (OSError, TypeError, ValueError) as exc:  # disk full, directory gone ...
                self.failed += 1
                if not self._warned:
                    log.error("capture: a record could not be written (%s); counting the rest", exc)
                    self._warned = True
                self._file = None  # a new file next time: the directory may come back
        if self._file is not None:
            self._file.close()

    def _write(self, record: dict[str, Any]) -> None:
        # The body as the JSON it is (it was valid: it was answered), the answer's arrays too.
        line = orjson.dumps(
            {**record, "body": orjson.Fragment(record["body"])},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        if self._file is None or self._rows >= self.config.rotate_rows:
            if self._file is not None:
                self._file.close()
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            name = f"{stamp}-{self.replica}-{os.getpid()}-{self.files:05d}.jsonl"
            self._file = (self.directory / name).open("ab")
            self._rows = 0
            self.files += 1
        self._file.write(line + b"\n")
        self._file.flush()  # readable while the replica runs (dlpipe drift, capture export)
        self._rows += 1
        self.written += 1
