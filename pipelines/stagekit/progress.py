"""Progress a person can watch, and logs a file can keep.

On a terminal, long work (epochs, trials, a k-sweep) draws one bar with an ETA that
redraws in place. Anywhere else (CI, `dvc repro > log`, a Ray worker's forwarded output) a
bar is a mess of carriage returns, so each step is one plain log line instead. Who decides
is the process a person watches: the stage's driver, by looking at its own stderr; a Ray
Train worker is told (its output is never a terminal) and draws through Ray's driver-side
bars (`ray.experimental.tqdm_ray`).
"""

from __future__ import annotations

import logging
import os
import sys
from types import TracebackType
from typing import TextIO

from tqdm import tqdm

PROGRESS_ENV = "DLPIPE_PROGRESS"
"""`bar` or `lines` forces one or the other (e.g. `lines` in a terminal recording a log)."""


def on_terminal(stream: TextIO | None = None) -> bool:
    """Whether progress should be drawn as bars: DLPIPE_PROGRESS says so, else `stream`
    (stderr) is a terminal that can redraw a line."""
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in ("bar", "lines"):
        return forced == "bar"
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM") != "dumb"


def _width() -> dict[str, object]:
    """Follow the terminal's width; a terminal that reports none (a fresh pseudo-terminal,
    `script` without a size) gets 100 x 24, where tqdm would draw nothing."""
    try:
        columns = os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        columns = 0
    return {"dynamic_ncols": True} if columns else {"ncols": 100, "nrows": 24}


class Progress:
    """`total` steps of `desc`: `step(status)` after each one. A bar with an ETA and the
    latest status on a terminal; otherwise `desc k/total: status` logged to `log`."""

    def __init__(
        self,
        total: int,
        desc: str,
        log: logging.Logger,
        unit: str = "step",
        bar: bool | None = None,
        initial: int = 0,
    ) -> None:
        self.total, self.desc, self.log = total, desc, log
        self.done = initial
        self.bar = (
            tqdm(total=total, desc=desc, unit=unit, initial=initial, **_width())
            if (on_terminal() if bar is None else bar)
            else None
        )

    def step(self, status: str = "", n: int = 1, line: str | None = None) -> None:
        """`status` beside the bar; the plain line says `line` when given (a bar has room
        for a short status only, a log line for the whole event)."""
        self.done += n
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=False)
            self.bar.update(n)
        else:
            said = line if line is not None else status
            self.log.info("%s %d/%d%s", self.desc, self.done, self.total, f": {said}" * bool(said))

    def note(self, status: str, line: str | None = None) -> None:
        """A change worth showing that is not a step (a trial started): the bar's status on
        a terminal, a log line (`line`, else `status`) otherwise."""
        if self.bar is not None:
            self.bar.set_postfix_str(status)
        else:
            self.log.info("%s: %s", self.desc, line if line is not None else status)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
