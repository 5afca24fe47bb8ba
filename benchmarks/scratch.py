"""What every benchmark shares: throw-away stores for its runs, and the machine's name."""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def scratch_stores() -> Iterator[Path]:
    """A temporary folder holding this benchmark's MLflow store and Ray checkpoints, so its
    runs never mix with the project's; removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="dlpipe-bench-") as scratch:
        workdir = Path(scratch)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
        os.environ["DLPIPE_STORAGE"] = str(workdir / "ray_results")
        yield workdir


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
