"""Faults in the data a stage reads and the disk it writes: a prepared array altered after
`prepare`, a stage killed while it writes its output, and an output directory with no
space left. Each stage command runs as dvc.yaml runs it, in a workspace copy."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.workspace import Workspace

PREPARED = "data/prepared/supervised"


def stage_command(ws: Workspace, stage: str) -> list[str]:
    """The stage's command line from dvc.yaml, its `${params.key}` filled in as DVC does."""
    import re
    import shlex

    import yaml

    cmd = yaml.safe_load((ws.root / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    params = yaml.safe_load((ws.root / "params.yaml").read_text())

    def value(match: re.Match) -> str:
        found: Any = params
        for key in match.group(1).split("."):
            found = found[key]
        return str(found)

    cmd = re.sub(r"\$\{([\w.]+)\}", value, cmd)
    return [sys.executable if word == "python" else word for word in shlex.split(cmd)]


def prepared_array_altered(ws: Workspace) -> dict[str, Any]:
    """One byte of a prepared array changed after `prepare`: the training stage must refuse
    it, naming the file, before any training starts."""
    ws.dvc("repro", "prepare")
    target = ws.root / PREPARED / "x_train.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # the last pixel value of the last image: still a valid .npy file
    target.write_bytes(bytes(data))
    started = time.monotonic()
    result = ws.run(stage_command(ws, "train_supervised"), check=False)
    seconds = time.monotonic() - started
    output = result.stdout
    named = "x_train.npy" in output and "sha256" in output
    trained = "epoch 1/" in output
    last_line = output.strip().splitlines()[-1] if output.strip() else ""
    ws.dvc("repro", "--force", "prepare")  # put the data back for the faults after this one
    return {
        "met": result.returncode != 0 and named and not trained,
        "target": "refused before training, the message naming the file",
        "exit_code": result.returncode,
        "message": last_line[-300:],
        "training_started": trained,
        "detected_after_s": round(seconds, 1),
    }


def stage_killed_mid_write(ws: Workspace, kills: int = 8) -> dict[str, Any]:
    """`prepare` SIGKILLed at spread-out moments of its run: afterwards its output folder is
    either the previous complete one or absent, never a partial one a later stage reads."""
    from pipelines.stagekit.dataset import load_prepared
    from pipelines.stagekit.errors import UserError

    ws.dvc("repro", "prepare")
    command = stage_command(ws, "prepare")
    full = _duration(ws, command)
    outcomes = {"complete": 0, "absent": 0, "partial": 0}
    staging = (ws.root / PREPARED).parent
    while_writing = 0
    for n in range(kills):
        process = ws.start(command)
        if n % 2:  # the moment its output folder is being written (a staging folder exists)
            # Polled without sleeping: the digits' staging folder lives a millisecond or
            # so, and a poll every 2 ms missed it in both tries of a CI run.
            deadline = time.monotonic() + 2 * full
            while not _staging_exists(staging) and time.monotonic() < deadline:
                pass
        else:  # spread over the whole run
            time.sleep(full * (n + 0.5) / kills)
        while_writing += _staging_exists(staging)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        try:
            load_prepared(ws.root / PREPARED)  # what every later stage does first
            outcomes["complete"] += 1
        except UserError as exc:
            outcomes["absent" if "not found" in str(exc) else "partial"] += 1
        except Exception:  # unreadable arrays: a partial output
            outcomes["partial"] += 1
    debris_after_kills = len(list(staging.glob(".*.tmp")))
    ws.dvc("repro", "--force", "prepare")
    debris = len(list(staging.glob(".*.tmp")))  # what the next run left of the killed ones
    return {
        "met": outcomes["partial"] == 0 and while_writing > 0 and debris == 0,
        "target": "no partial output a later stage would read; the next run clears the "
        "killed runs' staging folders",
        "kills": kills,
        "killed_while_writing": while_writing,
        "stage_seconds": round(full, 1),
        **{f"outputs_{k}": v for k, v in outcomes.items()},
        "staging_left_by_kills": debris_after_kills,
        "staging_left_after_next_run": debris,
    }


def output_dir_full(ws: Workspace, size: str = "16k") -> dict[str, Any]:
    """The training stage's output directory on a full disk (a tmpfs of `size`): a clear
    one-line error naming the path, no half-written model left as the output, and the
    checkpoints elsewhere untouched."""
    ws.dvc("repro", "prepare")
    out = ws.root / "full-disk"
    out.mkdir(exist_ok=True)
    command = stage_command(ws, "train_supervised")
    command[command.index("--output") + 1] = str(out / "model")
    with tmpfs(out, size):
        previous = out / "model" / "previous.txt"  # stands for an earlier good output
        with contextlib.suppress(OSError):
            previous.parent.mkdir(parents=True, exist_ok=True)
            previous.write_text("an earlier output\n")
        # One worker: the write of the output is under test (a second is ~9 s more here).
        ws.edit_params(lambda p: p["train"].update(epochs=2, num_workers=1))
        result = ws.run(command, check=False)
        left = sorted(p.name for p in (out / "model").iterdir()) if (out / "model").is_dir() else []
        debris = sorted(p.name for p in out.glob(".*"))
    output = result.stdout.strip().splitlines()
    last = output[-1] if output else ""
    clear = "No space left" in last and "full-disk" in last and "Traceback" not in result.stdout
    return {
        "met": result.returncode != 0 and clear and left == ["previous.txt"] and not debris,
        "target": "one clear error naming the path; the earlier output kept; no partial file",
        "exit_code": result.returncode,
        "message": last[-300:],
        "output_after": left,
        "debris": debris,
    }


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[None]:
    """A RAM file system of `size` mounted at `path` (needs root: CI runs as root)."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _staging_exists(folder: Path) -> bool:
    """Whether an output is being written in `folder` (stagekit/atomic.py's `.name.*.tmp`)."""
    with os.scandir(folder) as entries:
        return any(e.name.startswith(".") and e.name.endswith(".tmp") for e in entries)


def _duration(ws: Workspace, command: list[str]) -> float:
    started = time.monotonic()
    ws.run(command)
    return time.monotonic() - started
