"""Pipeline overhead: what DVC and `make demo` cost around the stages' own work.

- `noop_repro_s`: `dvc repro` on the full DAG with every stage up to date, the median of
  `--repeats` (3) runs: what each `dvc repro` / `make demo` pays before any stage runs. It is
  measured only when `dvc status` reports nothing changed: otherwise `dvc repro` would run
  those stages (and train), so the figure is left null with a note saying why.
- `demo_cold_s` (with `--demo`): `make demo` in a fresh copy of the working tree (the files
  git tracks or would track: what a clone holds, with no stage outputs, DVC cache, MLflow
  store or Ray checkpoints), so `dvc repro` runs every stage, then `dlpipe serve --demo`
  starts the Serve app and sends one prediction. The copy runs on this checkout's
  virtualenv (linked; `make` is told not to reinstall it): installing is not timed.
- `demo_warm_s` (with `--demo`): `make demo` again in the same copy: a no-op `dvc repro`
  and `dlpipe serve --demo`.

The demo runs start their own local Ray instances (`RAY_ADDRESS=local` unless RAY_ADDRESS
is set) and keep their MLflow runs inside the copy. Run from the repository root:

    python -m benchmarks.pipeline_overhead          # no-op repro only (seconds)
    python -m benchmarks.pipeline_overhead --demo   # + cold and warm `make demo` (the
                                                    # cold one trains every stage)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.scratch import machine, markdown_table, write_results

RESULTS = Path("benchmarks/results/pipeline.json")
TARGET_NOOP_S = 5.0
# The Makefile's install stamp: `make --old-file` on it keeps `make demo` from reinstalling
# the shared virtualenv (pyproject.toml may be newer than the stamp).
INSTALL_STAMP = ".venv/.installed-stamp"
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.com",
}


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    """Seconds `command` took and its output; a failure stops the benchmark with the output."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(command)} failed ({result.returncode}) in {cwd}:\n{output[-4000:]}"
        )
    return seconds, output


def stages_ran(output: str) -> list[str]:
    """The stages a `dvc repro` output says it ran."""
    return re.findall(r"Running stage '([^']+)'", output)


def dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def changed_stages(root: Path, env: dict[str, str]) -> list[str]:
    """What `dvc status` reports as changed (nothing when every stage is up to date)."""
    status = subprocess.run(
        dvc("status", "--json"), cwd=root, env=env, capture_output=True, text=True, check=True
    )
    return sorted(json.loads(status.stdout))


def noop_repro(root: Path, repeats: int, env: dict[str, str]) -> dict:
    changed = changed_stages(root, env)
    if changed:
        return {
            "noop_repro_s": None,
            "noop_note": f"not measured: `dvc status` lists {', '.join(changed)}; "
            "a `dvc repro` now would run them (run it first)",
        }
    runs = []
    for _ in range(repeats):
        seconds, output = timed(dvc("repro"), root, env)
        if ran := stages_ran(output):  # something changed between the status and now
            raise SystemExit(f"`dvc repro` was not a no-op: it ran {', '.join(ran)}")
        runs.append(round(seconds, 2))
    return {
        "noop_repro_s": statistics.median(runs),
        "noop_repro_runs_s": runs,
        "noop_note": f"median of {repeats} runs, every stage up to date",
    }


def working_tree_copy(root: Path, target: Path, env: dict[str, str]) -> None:
    """The files of `root` that git tracks or would track (ignored outputs, caches and
    stores left out), committed in a new git repository at `target`, and `root`'s
    virtualenv linked in."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, listing.split("\0")):
        source = root / name
        if source.is_file():  # `--cached` also lists files deleted in the working tree
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "copy"]):
        subprocess.run(command, cwd=target, env={**env, **GIT_IDENTITY}, check=True)
    # Linked after the commit: git's `.venv/` pattern matches directories, not this link.
    (target / ".venv").symlink_to((root / ".venv").resolve())


def demo(root: Path, env: dict[str, str]) -> dict:
    make = shutil.which("make")
    if make is None:
        raise SystemExit("`make` is needed for --demo")
    command = [make, "demo", f"--old-file={INSTALL_STAMP}"]
    with tempfile.TemporaryDirectory(prefix="dlpipe-demo-") as scratch:
        copy = Path(scratch)
        working_tree_copy(root, copy, env)
        print(f"cold `make demo` in a fresh copy ({copy}) ...", flush=True)
        cold, cold_output = timed(command, copy, env)
        print(f"  {cold:.1f} s, ran {len(stages_ran(cold_output))} stages", flush=True)
        warm, warm_output = timed(command, copy, env)
        print(f"warm `make demo`: {warm:.1f} s", flush=True)
    if ran := stages_ran(warm_output):
        raise SystemExit(f"the warm `make demo` ran {', '.join(ran)}: the cold run left changes")
    return {
        "demo_cold_s": round(cold, 1),
        "demo_cold_stages_run": len(stages_ran(cold_output)),
        "demo_warm_s": round(warm, 1),
        "demo_note": "fresh copy of the working tree, every stage run, then `dlpipe serve "
        "--demo`; warm: the same again with everything up to date",
    }


def demo_skipped() -> dict:
    return {
        "demo_cold_s": None,
        "demo_warm_s": None,
        "demo_note": "not measured: run `python -m benchmarks.pipeline_overhead --demo`",
    }


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def table(figures: dict) -> str:
    noop = figures["noop_repro_s"]
    if noop is None:
        verdict = "n/a"
    else:
        verdict = "met" if noop < TARGET_NOOP_S else "**MISSED**"
    rows = [
        ("no-op `dvc repro`, full DAG", _seconds(noop), f"< {TARGET_NOOP_S:g}", verdict),
        ("`make demo` cold", _seconds(figures["demo_cold_s"]), "", ""),
        ("`make demo` warm", _seconds(figures["demo_warm_s"]), "", ""),
    ]
    return markdown_table(("figure", "seconds", "target s", "target"), rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=".", help="the repository to measure")
    parser.add_argument("--repeats", type=int, default=3, help="no-op `dvc repro` runs")
    parser.add_argument("--demo", action="store_true", help="also time cold and warm make demo")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    root = Path(args.root).resolve()
    env = dict(os.environ)
    # The demo keeps its runs and checkpoints in the copy, whatever this shell points at.
    for name in ("MLFLOW_TRACKING_URI", "DLPIPE_STORAGE"):
        env.pop(name, None)
    # A local Ray per stage, as on a fresh machine, rather than joining one that runs here.
    env.setdefault("RAY_ADDRESS", "local")

    figures = noop_repro(root, args.repeats, env)
    print(f"no-op dvc repro: {_seconds(figures['noop_repro_s'])} s ({figures['noop_note']})")
    figures |= demo(root, env) if args.demo else demo_skipped()
    figures["noop_target_met"] = (
        None if figures["noop_repro_s"] is None else figures["noop_repro_s"] < TARGET_NOOP_S
    )
    figures["machine"] = machine()
    write_results(
        args.output,
        figures,
        table(figures),
        f"No-op repro: {figures['noop_note']}. Demo: {figures['demo_note']}.",
    )


if __name__ == "__main__":
    main()
