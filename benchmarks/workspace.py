"""A throwaway copy of the repository to run real pipeline stages in (`dvc repro`, stage
commands) without touching the checkout: its tracked files, no outputs, no `dvc.lock`, in a
fresh git repository, with its own MLflow store and checkpoint storage, joining a Ray
cluster that the caller started. The fault-injection runs (benchmarks/chaos.py) and the
DVC pipeline test build on it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "dlpipe",
    "GIT_AUTHOR_EMAIL": "dlpipe@example.com",
    "GIT_COMMITTER_NAME": "dlpipe",
    "GIT_COMMITTER_EMAIL": "dlpipe@example.com",
}


@dataclass
class Workspace:
    root: Path
    env: dict[str, str]

    def edit_params(self, edit: Callable[[dict[str, Any]], None]) -> None:
        """Change params.yaml in place (`edit` gets the parsed file)."""
        path = self.root / "params.yaml"
        params = yaml.safe_load(path.read_text())
        edit(params)
        path.write_text(yaml.safe_dump(params, sort_keys=False))

    def run(
        self, command: list[str], timeout_s: float = 1200, check: bool = True, **env: str
    ) -> subprocess.CompletedProcess:
        """`command` in the workspace, stdout and stderr together (see `run_process_group`)."""
        result = run_process_group(
            command, self.root, {**self.env, **env}, timeout_s, merge_output=True
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}"
            )
        return result

    def start(self, command: list[str], **env: str) -> subprocess.Popen:
        """`command` started in a process group of its own (kill it whole with os.killpg),
        stdout and stderr together, as text."""
        return subprocess.Popen(
            command,
            cwd=self.root,
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def copy(self, root: Path) -> Workspace:
        """A copy of this workspace at `root` (files, git, DVC cache, MLflow store), with
        its own MLflow store and checkpoint storage from then on."""
        shutil.copytree(self.root, root, symlinks=True)
        return Workspace(root, {**self.env, **_stores(root)})

    def dvc(self, *args: str, timeout_s: float = 1200, **env: str) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-m", "dvc", *args], timeout_s=timeout_s, **env)


def run_process_group(
    command: list[str],
    cwd: Path,
    env: dict[str, str],
    timeout_s: float,
    merge_output: bool = False,
) -> subprocess.CompletedProcess:
    """`subprocess.run` with output captured, in a process group of its own that is killed
    whole on timeout: a timed-out `dvc repro` must not leave its stage running, holding the
    cluster's CPUs while everything after it waits for them."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_output else subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise TimeoutError(
            f"{' '.join(command)} did not finish within {timeout_s:g} s:\n{stdout}\n{stderr or ''}"
        ) from None
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr or "")


def copy_repository(root: Path, ray_address: str) -> Workspace:
    """The checkout's tracked files, minus outputs and lock, as a new git repository at
    `root`; its stages join the Ray cluster at `ray_address` and track to `root`'s own
    MLflow store and checkpoint storage."""
    root.mkdir(parents=True, exist_ok=True)
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in tracked:
        if name == "dvc.lock" or name.startswith(("metrics/", "plots/")):
            continue
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)
    env = {
        **os.environ,
        **GIT_IDENTITY,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "RAY_ADDRESS": ray_address,  # stages join the caller's cluster instead of starting one
        **_stores(root),
    }
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=root, env=env, check=True)
    return Workspace(root, env)


def _stores(root: Path) -> dict[str, str]:
    # Under mlruns/, which .gitignore leaves out: a tracking database in git would be
    # committed with the outputs, and `dvc exp run` stashes and restores what git sees.
    (root / "mlruns").mkdir(parents=True, exist_ok=True)
    return {
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlruns' / 'mlflow.db'}",
        "DLPIPE_STORAGE": str(root / "ray_results"),
    }
