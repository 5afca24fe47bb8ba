"""Pipeline overhead: what DVC and `make demo` cost around the stages' own work.

- `noop_repro_s`: `dvc repro` on the full DAG with every stage up to date, the median of
  `--repeats` (3) runs: what each `dvc repro` / `make demo` pays before any stage runs. It is
  measured only when `dvc status` reports nothing changed: otherwise `dvc repro` would run
  those stages (and train), so the figure is left null with a note saying why; with
  `--demo`, it is then measured in the demo's copy, where the cold demo ran every stage.
- `demo_cold_s` (with `--demo`): `make demo` in a fresh copy of the working tree (the files
  git tracks or would track: what a clone holds, with no stage outputs, DVC cache, MLflow
  store or Ray checkpoints), so its `dvc repro`s run every stage and its `dlpipe serve
  --demo`s start the Serve app and send predictions. The copy runs on this checkout's
  virtualenv (linked; `make` is told not to reinstall it). Split into
  `demo_cold_stages_s` (each stage, from dvc's "Running stage" line to the next line that
  starts a stage or a command: the stage's command and dvc's own work after it, hashing and
  caching its outputs), `demo_cold_steps_s` (each of the Makefile's commands, in order, with
  the stages it ran), `demo_cold_serve_s` (the `dlpipe serve --demo`s together) and
  `demo_cold_first_prediction_s` (from the start to the first answer printed).
- `install_s` (with `--install`): `make install` into a new virtualenv in the copy (pip
  from the registries, through pip's cache when it has the wheels), what a new user pays
  once before the demo; the demo then runs on that virtualenv.
- `demo_warm_s` (with `--demo`): `make demo` again in the same copy: no-op `dvc repro`s
  and the `dlpipe serve --demo`s.
- `demo_cold_before` (with `--before COMMIT`): the cold figures this file held at COMMIT,
  kept beside the new ones (the before/after table); `--before FILE`: those of a results
  file this benchmark wrote, e.g. with DLPIPE_PRELOAD=0 the same hour.

The demo runs start their own local Ray instances (`RAY_ADDRESS=local` unless RAY_ADDRESS
is set: never one already running on the machine; each `dlpipe run` starts one that its
stages share) and keep their MLflow runs inside the copy. Run from the repository root:

    python -m benchmarks.pipeline_overhead          # no-op repro only (seconds)
    python -m benchmarks.pipeline_overhead --demo   # + cold and warm `make demo` (the
                                                    # cold one trains every stage)
    python -m benchmarks.pipeline_overhead --demo --install   # + `make install` first
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.scratch import machine, markdown_table, write_results

RESULTS = Path("benchmarks/results/pipeline.json")
TARGET_NOOP_S = 5.0
TARGET_COLD_S = 12 * 60.0
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


STAGE_LINE = re.compile(r"Running stage '([^']+)'")
# make echoes each command of the recipe: `PATH="...:$PATH" .venv/bin/dvc repro export`.
COMMAND_LINE = re.compile(r"^PATH=\S* \S*/bin/((?:dvc|dlpipe) [^\n]*?)\s*$", re.MULTILINE)
PHASE_LINE = re.compile(f"{STAGE_LINE.pattern}|{COMMAND_LINE.pattern}", re.MULTILINE)
# `dlpipe run --jobs`: each line of a chain of stages starts with the stage it runs.
LABELLED_LINE = re.compile(r"^([\w.@:/-]+) \| ", re.MULTILINE)
# `dlpipe serve --demo`'s answer: `{"label": ...` on the lines after its POST.
ANSWER_LINE = re.compile(r'POST \S+/v1/classify[^\n]*\n\{\s*"label": ')


@dataclass
class Phases:
    """What `timed_phases` read from a `make demo`'s output."""

    seconds: float = 0.0
    steps: list[dict] = field(default_factory=list)
    """Each command make ran, in order: {"command", "seconds", "stages": {stage: seconds}}."""
    first_answer_s: float | None = None
    output: str = ""

    def stages(self) -> dict[str, float]:
        return {k: v for step in self.steps for k, v in step["stages"].items()}


def timed_phases(command: list[str], cwd: Path, env: dict[str, str]) -> Phases:
    """Run a `make demo`, timing each command of its recipe and each stage its `dvc repro`s
    run (from each "Running stage" or command line to the next; the last to the end), as
    the output arrives, and when the first prediction is printed.

    The output is scanned in the chunks the pipe delivers, not line by line: a stage that
    ends its output without a newline (a progress bar) would glue dvc's next "Running
    stage" line to its own, to be read only when a later newline came."""
    started = time.perf_counter()
    # Unbuffered: through a pipe dvc (Python) would write its lines in blocks.
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    phases = Phases()
    step: dict | None = None
    stage, phase_start = None, started
    chunks, pending = [], ""
    # Incremental: a character split between two chunks (a progress bar's block) decodes whole.
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    # Stages side by side (`dlpipe run --jobs`): name -> [its "Running stage" line, the
    # last line it printed].
    side_by_side: dict[str, list[float]] = {}
    labels_from = 0

    def close_phase(now: float) -> None:
        if step is not None:
            step["seconds"] = round(now - step["_start"], 1)
            if stage is not None:
                step["stages"][stage] = round(now - phase_start, 1)
            for name, (first, last) in side_by_side.items():
                step["stages"][name] = round(last - first, 1)
        side_by_side.clear()

    try:
        while chunk := os.read(process.stdout.fileno(), 65536):
            now = time.perf_counter()
            text = decoder.decode(chunk)
            chunks.append(text)
            pending += text
            if phases.first_answer_s is None and ANSWER_LINE.search(pending):
                phases.first_answer_s = round(now - started, 1)
                print(f"  {now - started:7.1f} s  first prediction", flush=True)
            kept_from = max(0, len(pending) - 200)  # a line cut by the chunk's end, kept
            for match in PHASE_LINE.finditer(pending):
                line_start = pending.rfind("\n", 0, match.start()) + 1
                if match.group(1) is not None and LABELLED_LINE.match(pending, line_start):
                    side_by_side[match.group(1)] = [now, now]  # ends at its last line
                elif match.group(1) is not None:  # a stage of the running `dvc repro`
                    if step is not None and stage is not None:
                        step["stages"][stage] = round(now - phase_start, 1)
                    stage, phase_start = match.group(1), now
                else:  # make starts the recipe's next command
                    close_phase(now)
                    step = {"command": match.group(2), "_start": now, "stages": {}}
                    phases.steps.append(step)
                    stage = None
                kept_from = max(kept_from, match.end())
                print(f"  {now - started:7.1f} s  {match.group(1) or match.group(2)}", flush=True)
            for label in LABELLED_LINE.finditer(pending, labels_from):
                if label.group(1) in side_by_side:
                    side_by_side[label.group(1)][1] = now
            labels_from = max(0, len(pending) - kept_from)  # the lines seen, not again
            pending = pending[kept_from:]
    finally:
        if process.poll() is None and sys.exc_info()[0] is not None:
            process.kill()
    process.wait()
    close_phase(time.perf_counter())
    phases.seconds = time.perf_counter() - started
    for each in phases.steps:
        del each["_start"]
    phases.output = "".join(chunks)
    if process.returncode != 0:
        raise SystemExit(
            f"{' '.join(command)} failed ({process.returncode}) in {cwd}:\n{phases.output[-4000:]}"
        )
    return phases


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


def working_tree_copy(
    root: Path, target: Path, env: dict[str, str], link_venv: bool = True
) -> None:
    """The files of `root` that git tracks or would track (ignored outputs, caches and
    stores left out), committed in a new git repository at `target`, and `root`'s
    virtualenv linked in (unless `link_venv` is false: `make install` makes its own)."""
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
    if link_venv:
        (target / ".venv").symlink_to((root / ".venv").resolve())


def demo(root: Path, env: dict[str, str], install: bool, noop_repeats: int = 0) -> dict:
    """The cold and warm `make demo` in a fresh copy of `root` (and `make install` first
    when `install`); with `noop_repeats`, the no-op `dvc repro` measured in that copy
    after its demos, where every stage is up to date."""
    make = shutil.which("make")
    if make is None:
        raise SystemExit("`make` is needed for --demo")
    with tempfile.TemporaryDirectory(prefix="dlpipe-demo-") as scratch:
        copy = Path(scratch)
        working_tree_copy(root, copy, env, link_venv=not install)
        installed = None
        if install:
            print(f"`make install` in a fresh copy ({copy}) ...", flush=True)
            installed, _ = timed([make, "install"], copy, env)
            print(f"  {installed:.1f} s", flush=True)
        print(f"cold `make demo` in a fresh copy ({copy}) ...", flush=True)
        cold = timed_phases([make, "demo", f"--old-file={INSTALL_STAMP}"], copy, env)
        stages = cold.stages()
        serve = sum(
            step["seconds"] for step in cold.steps if step["command"].startswith("dlpipe serve")
        )
        print(
            f"  {cold.seconds:.1f} s ({len(stages)} stages, {serve:.1f} s dlpipe serve --demo; "
            f"first prediction at {_seconds(cold.first_answer_s)} s)",
            flush=True,
        )
        warm, warm_output = timed([make, "demo", f"--old-file={INSTALL_STAMP}"], copy, env)
        print(f"warm `make demo`: {warm:.1f} s", flush=True)
        noop = noop_repro(copy, noop_repeats, env) if noop_repeats else {}
        if noop:
            noop["noop_note"] += ", in the cold demo's copy after its runs"
    if ran := stages_ran(warm_output):
        raise SystemExit(f"the warm `make demo` ran {', '.join(ran)}: the cold run left changes")
    return {
        **noop,
        "install_s": None if installed is None else round(installed, 1),
        "demo_cold_s": round(cold.seconds, 1),
        "demo_cold_first_prediction_s": cold.first_answer_s,
        "demo_cold_steps_s": cold.steps,
        "demo_cold_stages_s": stages,
        "demo_cold_serve_s": round(serve, 1),
        "demo_cold_stages_run": len(stages_ran(cold.output)),
        "demo_warm_s": round(warm, 1),
        "demo_note": "`make demo` in a fresh copy of the working tree: `dlpipe run export`, "
        "`dlpipe serve --demo` (the first prediction), `dlpipe run` (every other stage), "
        "`dlpipe serve --demo`; warm: `make demo` again with everything up to date"
        + ("; after `make install` into a new virtualenv" if install else ""),
    }


def demo_skipped() -> dict:
    return {
        "install_s": None,
        "demo_cold_s": None,
        "demo_cold_stages_s": {},
        "demo_warm_s": None,
        "demo_note": "not measured: run `python -m benchmarks.pipeline_overhead --demo`",
    }


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def before_figures(root: Path, commit: str) -> dict:
    """The cold `make demo` figures of this file as committed at `commit`, or of a results
    file this benchmark wrote (e.g. the same hour with DLPIPE_PRELOAD=0), named by its stem."""
    if Path(commit).is_file():
        old = json.loads(Path(commit).read_text())
        commit = Path(commit).stem
    else:
        shown = subprocess.run(
            ["git", "show", f"{commit}:{RESULTS}"],
            cwd=root,
            capture_output=True,
            text=True,
            check=False,
        )
        if shown.returncode != 0:
            raise SystemExit(f"--before {commit}: no {RESULTS} there ({shown.stderr.strip()})")
        old = json.loads(shown.stdout)
    if old.get("demo_cold_s") is None:
        raise SystemExit(f"--before {commit}: {RESULTS} there has no cold `make demo` figures")
    return {
        "commit": commit,
        "demo_cold_s": old["demo_cold_s"],
        "demo_cold_stages_s": old.get("demo_cold_stages_s", {}),
        "demo_cold_serve_s": old.get("demo_cold_serve_s"),
        "demo_cold_first_prediction_s": old.get("demo_cold_first_prediction_s", old["demo_cold_s"]),
    }


def table(figures: dict) -> str:
    noop = figures["noop_repro_s"]
    if noop is None:
        verdict = "n/a"
    else:
        verdict = "met" if noop < TARGET_NOOP_S else "**MISSED**"
    cold = figures["demo_cold_s"]
    before = figures.get("demo_cold_before") or {}
    old_stages = before.get("demo_cold_stages_s", {})
    first = figures.get("demo_cold_first_prediction_s")
    rows = [
        ("no-op `dvc repro`, full DAG", "", _seconds(noop), f"< {TARGET_NOOP_S:g}", verdict),
        ("`make install` (new virtualenv)", "", _seconds(figures["install_s"]), "", ""),
        (
            "`make demo` cold",
            _seconds(before.get("demo_cold_s")),
            _seconds(cold),
            f"<= {TARGET_COLD_S:g}",
            "n/a" if cold is None else ("met" if cold <= TARGET_COLD_S else "**MISSED**"),
        ),
        (
            "  first prediction printed",
            _seconds(before.get("demo_cold_first_prediction_s")),
            _seconds(first),
            "",
            "",
        ),
        *(
            (f"  stage `{stage}`", _seconds(old_stages.get(stage)), _seconds(seconds), "", "")
            for stage, seconds in figures["demo_cold_stages_s"].items()
        ),
        (
            "  `dlpipe serve --demo`",
            _seconds(before.get("demo_cold_serve_s")),
            _seconds(figures.get("demo_cold_serve_s")),
            "",
            "",
        ),
        ("`make demo` warm", "", _seconds(figures["demo_warm_s"]), "", ""),
    ]
    label = before.get("commit", "")
    label = label[:7] if re.fullmatch(r"[0-9a-f]{8,40}", label) else label  # a commit, shortened
    before_heading = f"before ({label}) s" if before else "before s"
    return markdown_table(("figure", before_heading, "seconds", "target s", "target"), rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=".", help="the repository to measure")
    parser.add_argument("--repeats", type=int, default=3, help="no-op `dvc repro` runs")
    parser.add_argument("--demo", action="store_true", help="also time cold and warm make demo")
    parser.add_argument(
        "--install", action="store_true", help="with --demo: `make install` a new virtualenv first"
    )
    parser.add_argument(
        "--before",
        metavar="COMMIT|FILE",
        help="with --demo: keep the cold figures committed at COMMIT (or in a results file "
        "this benchmark wrote) beside the new ones",
    )
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()
    root = Path(args.root).resolve()
    env = dict(os.environ)
    # The demo keeps its runs and checkpoints in the copy, whatever this shell points at.
    for name in ("MLFLOW_TRACKING_URI", "DLPIPE_STORAGE"):
        env.pop(name, None)
    # A local Ray per stage, as on a fresh machine, rather than joining one that runs here.
    env.setdefault("RAY_ADDRESS", "local")

    before = before_figures(root, args.before) if args.before else None
    figures = noop_repro(root, args.repeats, env)
    print(f"no-op dvc repro: {_seconds(figures['noop_repro_s'])} s ({figures['noop_note']})")
    if args.demo:
        # This checkout's stages not all run: the copy's, once the demo has run them all.
        unmeasured = figures["noop_repro_s"] is None
        figures |= demo(root, env, args.install, args.repeats if unmeasured else 0)
        if unmeasured:
            print(
                f"no-op dvc repro: {_seconds(figures['noop_repro_s'])} s ({figures['noop_note']})"
            )
    else:
        figures |= demo_skipped()
    figures["demo_cold_before"] = before
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
