"""What every benchmark shares: throw-away stores for its runs, the machine's name, and how
results are written (JSON, and a markdown table beside it)."""

from __future__ import annotations

import contextlib
import os
import platform
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from pipelines.stagekit.atomic import write_json, write_text


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


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A results table as the READMEs show it: one line a row, cells as given."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(output: str | Path, figures: dict, table: str, note: str) -> None:
    """`figures` as JSON at `output`, and beside it (`.md`) `table` followed by the machine
    and `note` (how it was measured); the markdown is printed too."""
    write_json(output, figures)
    report = f"{table}\n\nMachine: {machine()}. {note}\n"
    write_text(Path(output).with_suffix(".md"), report)
    print("\n" + report)
