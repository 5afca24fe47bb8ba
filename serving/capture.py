"""Request capture: a sampled share of the requests and their answers, written off the
request path to rotating JSON-lines files, for drift reports and for training on what
production sees (`dlpipe capture export`). Set live through `user_config.capture`:

    capture:
      rate: 0.01              # the share of requests kept (0: off)
      directory: captures     # on a cluster: a path every replica's node shares
      max_queue: 10000        # records waiting for the writer; beyond, dropped and counted
      rotate_rows: 10000      # records per file

A request only pays a random draw and, when sampled, an append to a bounded queue; a
thread of the replica wakes every `WRITE_EVERY_S` and writes what is queued, one flush a
turn. A full queue drops the record (counted); a write that fails (disk full, directory
gone) is counted and logged once, and serving goes on. Each record: request id, time,
route, model, version, the request's JSON body and the answer.

Measured (benchmarks/request_path.py, `capture_us`: capturing every request, beside a
request's own ~25 us of CPU in that benchmark): 33 us a request with records queued as
dicts on a `queue.Queue` that woke the writer for each; 21 with the writer on a timer;
4 with each record serialized on the request path, so that the queue holds bytes, which
the garbage collector does not walk (thousands of queued dicts made its collections long).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from serving.live_settings import over_defaults

log = logging.getLogger(__name__)

WRITE_EVERY_S = 0.05
"""How often the writer takes what is queued: a record is in its file within about this."""


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
        self._queued: deque[bytes] = deque()
        """Appended by the request path, taken by the writer (deque's ends are thread-safe)."""
        self.captured = self.dropped = self.failed = self.written = self.files = 0
        self.unwritable = 0
        self._file: Any = None
        self._rows = 0
        self._unflushed = 0
        """Records written to the open file since its last flush (counted once flushed)."""
        self._warned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="dlpipe-capture", daemon=True)
        self._thread.start()

    def offer(self, route: str, body: bytes, answer: dict[str, Any]) -> None:
        """Keep this request with `config.rate` probability (never blocks, never raises)."""
        if self.config.rate <= 0 or random.random() >= self.config.rate:
            return
        if len(self._queued) >= self.config.max_queue:
            self.dropped += 1
            return
        record = {
            # Random, not uuid4: its os.urandom call cost more than the rest of a record.
            "request_id": f"{random.getrandbits(128):032x}",
            "time": time.time(),
            "route": route,
            "model": answer.get("model"),
            "version": answer.get("version"),
            # The body as the JSON it is (it was valid: it was answered).
            "body": orjson.Fragment(body),
            "answer": answer,
        }
        try:
            # Serialized here, not by the writer: queued bytes are not objects the garbage
            # collector walks, where queued dicts were, a collection's worth a turn.
            line = orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY)
        except (TypeError, ValueError) as exc:  # an answer orjson cannot write: a bug
            self.unwritable += 1  # its own count: `failed` is the writer thread's
            if self.unwritable == 1:
                log.error("capture: a record could not be serialized (%s); counting the rest", exc)
            return
        self._queued.append(line)
        self.captured += 1

    @property
    def backlog(self) -> int:
        """Records captured and not yet written (nor counted as failed)."""
        return self.captured - self.written - self.failed

    def status(self) -> dict[str, Any]:
        return {
            **asdict(self.config),
            "directory": str(self.directory),
            "captured": self.captured,
            "dropped": self.dropped,
            "failed": self.failed + self.unwritable,
            "written": self.written,
            "files": self.files,
        }

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (up to `timeout_s`), then stop the writer."""
        self._stop.set()
        self._thread.join(timeout_s)

    def _drain(self) -> None:
        while True:
            stopping = self._stop.wait(WRITE_EVERY_S)
            while self._queued:
                line = self._queued.popleft()
                try:
                    self._write(line)
                except OSError as exc:  # disk full, directory gone ...
                    self._lost(1, exc)
            self._flush()
            if stopping:
                break
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self._lost(0, exc)

    def _write(self, line: bytes) -> None:
        if self._file is None or self._rows >= self.config.rotate_rows:
            self._flush()  # the old file's records counted before it closes (or dropped)
            if self._file is not None:
                self._file.close()
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            name = f"{stamp}-{self.replica}-{os.getpid()}-{self.files:05d}.jsonl"
            self._file = (self.directory / name).open("ab")
            self._rows = 0
            self.files += 1
        self._file.write(line + b"\n")
        self._rows += 1
        self._unflushed += 1

    def _flush(self) -> None:
        """Flush the open file (readable while the replica runs: `dlpipe drift`, `dlpipe
        capture export`) and count its records as written."""
        if self._file is None or not self._unflushed:
            return
        try:
            self._file.flush()
        except OSError as exc:
            self._lost(0, exc)
            return
        self.written += self._unflushed
        self._unflushed = 0

    def _lost(self, count: int, exc: Exception) -> None:
        """`count` records and those not yet flushed could not be written: counted, logged
        once; the file is dropped (a new one next time: the directory may come back)."""
        self.failed += count + self._unflushed
        self._unflushed = 0
        if not self._warned:
            log.error("capture: a record could not be written (%s); counting the rest", exc)
            self._warned = True
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # what it buffered is lost, and already counted
        self._file = None
