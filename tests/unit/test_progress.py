"""Long work draws a bar with an ETA on a terminal and writes plain lines anywhere else:
checked in a real pseudo-terminal and through a pipe."""

import os
import pty
import subprocess
import sys

from tests.helpers import REPO

STEPS = """
import logging, sys, time
from pipelines.stagekit.progress import Progress
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
with Progress(3, "k-sweep", logging.getLogger("demo"), unit="k") as progress:
    for k in range(3):
        time.sleep(0.05)
        progress.step(f"k={k + 2}: silhouette 0.5")
"""


def run_on_a_terminal(env: dict[str, str]) -> str:
    """The script's output as a terminal shows it: stdout and stderr on a pseudo-terminal."""
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-c", STEPS],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        cwd=REPO,
        env=env,
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    process.wait(timeout=60)
    os.close(leader)
    return b"".join(chunks).decode(errors="replace")


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DLPIPE_PROGRESS"}
    return {**env, "TERM": "xterm", "PYTHONPATH": str(REPO), **extra}


def test_a_terminal_gets_one_bar_with_an_eta_redrawn_in_place():
    shown = run_on_a_terminal(environment())
    assert "\r" in shown  # redrawn in place
    assert "k-sweep: 100%" in shown and "3/3" in shown
    assert "<00:00" in shown  # the ETA
    assert "k=4: silhouette 0.5" in shown  # the latest step's status
    assert "k-sweep 1/3" not in shown  # no log lines


def test_a_pipe_gets_one_plain_line_per_step():
    result = subprocess.run(
        [sys.executable, "-c", STEPS],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stderr.splitlines() == [
        "k-sweep 1/3: k=2: silhouette 0.5",
        "k-sweep 2/3: k=3: silhouette 0.5",
        "k-sweep 3/3: k=4: silhouette 0.5",
    ]


def test_the_choice_can_be_forced_either_way():
    assert "k-sweep 1/3: k=2" in run_on_a_terminal(environment(DLPIPE_PROGRESS="lines"))
    forced = subprocess.run(
        [sys.executable, "-c", STEPS],
        cwd=REPO,
        env=environment(DLPIPE_PROGRESS="bar"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "k-sweep: 100%" in forced.stderr
