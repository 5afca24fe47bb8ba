"""`dlpipe`: one console script for the pipeline and its models.

dlpipe run [STAGE ...]    re-run what changed (dvc repro), up to STAGE
dlpipe ui                 open the MLflow dashboard
dlpipe tracking sync      send what stages kept while the MLflow server was down
dlpipe lineage MODEL      a registered model's chain back to its data, params and commit
dlpipe report             write reports/index.html: every stage's figures beside baselines
dlpipe serve ...          serve, reload and query the models (serving/cli.py)
dlpipe predict IMAGE ...  classify images through a running server (serving/cli.py)
dlpipe drift              captured requests against each model's reference (serving/cli.py)
dlpipe capture export     captured inputs -> a DVC-tracked unlabeled pool (serving/cli.py)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from pipelines.stagekit.errors import UserError
from pipelines.stagekit.lineage import format_lineage
from pipelines.stagekit.spool import spool_dir
from pipelines.stagekit.tracking import (
    DASHBOARD_HOST,
    DASHBOARD_PORT,
    create_store,
    redacted_uri,
    registry_lineage,
    sync_spool,
    tracking_uri,
)
from serving import cli as serving_cli


def cmd_run(args: argparse.Namespace) -> int:
    """`dvc repro`, its stages sharing one local Ray instance when any has to run; with
    `--jobs` above 1, independent stages side by side (pipelines/stagekit/dag.py)."""
    from pipelines.stagekit.forkserver import preloaded_stages
    from pipelines.training.cluster import local_ray_for_stages

    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    command = [dvc, "repro", *(["--force"] if args.force else []), *args.stages]
    shown = " ".join(["$ dvc", *command[1:]])
    if args.jobs > 1:
        return _run_side_by_side(dvc, args, command)
    if not args.force:
        changed = _changed(dvc, args.stages)
        if changed is False:  # what `dvc repro` would find again, after as long
            print("nothing to run: dvc status finds every stage up to date", flush=True)
            return 0
        if changed is None:  # DVC's own error, without a Ray started for nothing
            print(shown, flush=True)
            return _run_and_wait(command, dict(os.environ))
    print(shown, flush=True)
    with local_ray_for_stages() as ray_env:
        if ray_env:
            print(f"the stages join one local Ray at {ray_env['RAY_ADDRESS']}", flush=True)
        with preloaded_stages({**os.environ, **ray_env}) as env:
            return _run_and_wait(command, env)


def _run_side_by_side(dvc: str, args: argparse.Namespace, repro: list[str]) -> int:
    """`dlpipe run --jobs N`: the stages `dvc repro` would run, cut into chains that run
    side by side (pipelines/stagekit/dag.py), on one local Ray instance as `cmd_run`'s;
    `repro`, the plain `dvc repro` command, names DVC's error when there is no plan."""
    from pipelines.stagekit.dag import pending_ray_groups, plan_chains, run_chains
    from pipelines.stagekit.forkserver import preloaded_stages
    from pipelines.training.cluster import SIDE_BY_SIDE_ENV, local_ray_for_stages

    chains = plan_chains(args.stages, args.force)
    if chains is None:  # DVC's own error: `dvc repro` names it, without a Ray started
        print(" ".join(["$ dvc", *repro[1:]]), flush=True)
        return _run_and_wait(repro, dict(os.environ))
    if not chains:
        print("nothing to run: dvc status finds every stage up to date", flush=True)
        return 0
    command = [dvc, "--wait-for-lock", "repro", "--single-item"]
    command += ["--force"] if args.force else []
    stages = sum(len(chain.stages) for chain in chains)
    print(f"{stages} stage(s) in {len(chains)} chain(s), up to {args.jobs} at once", flush=True)
    with local_ray_for_stages(side_by_side=True) as ray_env:
        if ray_env:
            print(f"the stages join one local Ray at {ray_env['RAY_ADDRESS']}", flush=True)
        # Only on the instance this process started: there the stages wait for each
        # other's CPUs. A cluster's autoscaler adds nodes instead.
        waiting = pending_ray_groups if ray_env else None
        env = {**os.environ, **ray_env, **({SIDE_BY_SIDE_ENV: "1"} if ray_env else {})}
        with preloaded_stages(env) as env:
            return run_chains(chains, command, env, args.jobs, waiting)


def _changed(dvc: str, stages: list[str]) -> bool | None:
    """Whether `dvc status` finds something to run for `stages` (all when empty); None when
    it fails (a stage name that does not exist, a broken dvc.yaml)."""
    status = subprocess.run(
        [dvc, "status", "--json", *(["--with-deps", *stages] if stages else [])],
        capture_output=True,
        text=True,
        check=False,
    )
    if status.returncode != 0:
        return None
    try:
        return json.loads(status.stdout) != {}
    except json.JSONDecodeError:
        return True  # a status it printed but not as JSON: something to run, then


def _run_and_wait(command: list[str], env: dict[str, str]) -> int:
    """Run `command` in a process group of its own and wait for it, passing on Ctrl-C and
    SIGTERM to the whole group: DVC and the stage it runs stop as they would in the
    terminal, while this process, which holds the stages' Ray, goes only after them. (In
    one group with DVC, a SIGTERM or SIGINT sent to this process alone would have stopped
    Ray under a running stage, or been waited out for ever.)"""
    process: subprocess.Popen | None = None

    def pass_on(signum: int, frame: object) -> None:
        if process is None:  # DVC not started yet: nothing to wait for
            sys.exit(128 + signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)

    previous = signal.signal(signal.SIGTERM, pass_on)
    try:
        process = subprocess.Popen(command, env=env, process_group=0)
        while True:
            try:
                return process.wait()
            except KeyboardInterrupt:
                pass_on(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_ui(args: argparse.Namespace) -> int:
    uri = tracking_uri()
    env = dict(os.environ)  # the server's, without the client settings _client() sets
    create_store(uri)  # under dlpipe's lock, in case a stage opens the new store at once
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    print(f"MLflow dashboard for {uri} at http://{args.host}:{args.port}", flush=True)
    os.execve(
        mlflow,
        [mlflow, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)],
        env,
    )
    return 0  # not reached


def cmd_tracking_sync(args: argparse.Namespace) -> int:
    """Replay the spool (pipelines/stagekit/spool.py); exit 1 while anything still waits."""
    uri, spool = tracking_uri(), spool_dir()
    counts = sync_spool(uri, spool)
    if not counts:
        print(f"nothing kept in {spool}: every record has reached its tracking server")
        return 0
    for run_id, (sent, refused, waiting) in counts.items():
        state = f"{waiting} still waiting" if waiting else "none left"
        aside = f", {refused} refused (set aside in {spool}/rejected)" if refused else ""
        print(f"run {run_id}: {sent} record(s) sent{aside}, {state}")
    if any(waiting for _, _, waiting in counts.values()):
        print(
            f"the tracking server ({redacted_uri(uri)}) did not take everything: the rest stays in {spool}"
        )
        return 1
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    try:
        chain = registry_lineage(args.model, args.version)
    except UserError as exc:
        print(f"dlpipe lineage: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(chain, indent=2) if args.json else format_lineage(chain))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipelines.review.report import STAGE, report
    from pipelines.stagekit.stage import run_stage

    options = {"output": args.output} if args.output else {}
    run_stage(STAGE, lambda: print(f"report: {report(**options).resolve()}"))
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="dlpipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = top.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="re-run changed pipeline stages (dvc repro)",
        description="dvc repro, its stages joining one local Ray instance (unless RAY_ADDRESS "
        "names a cluster) and starting as forks of one interpreter that has imported torch, "
        "MLflow and ONNX (DLPIPE_PRELOAD=0: plain interpreters; verbose: says why a stage "
        "ran as one).",
    )
    run.add_argument("stages", nargs="*", help="stage names from dvc.yaml (default: all)")
    run.add_argument("--force", action="store_true", help="re-run even if nothing changed")
    run.add_argument(
        "-j",
        "--jobs",
        type=serving_cli.positive_int,
        default=1,
        metavar="N",
        help="run up to N independent stages at once (default 1, as dvc repro)",
    )
    run.set_defaults(func=cmd_run)

    serving_cli.add_commands(sub)

    tracking = sub.add_parser("tracking", help="the MLflow tracking store")
    tracking_sub = tracking.add_subparsers(dest="action", required=True)
    sync = tracking_sub.add_parser(
        "sync", help="send the records kept while the tracking server did not answer"
    )
    sync.set_defaults(func=cmd_tracking_sync)

    lineage = sub.add_parser(
        "lineage",
        help="a registered model's chain: version, ONNX sha256, run, commit, stages, data",
        description="Print where a registered model version came from: ONNX sha256 -> MLflow "
        "run (and parent) -> git commit -> DVC stages with the sha256 of every dependency "
        "and the params they ran with.",
    )
    lineage.add_argument(
        "model",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, or NAME (with VERSION): the `model` "
        "and `version` of an HTTP answer",
    )
    lineage.add_argument("version", nargs="?", help="the version, when MODEL is a bare name")
    lineage.add_argument("--json", action="store_true", help="print the chain as JSON")
    lineage.set_defaults(func=cmd_lineage)

    report = sub.add_parser(
        "report", help="write the pipeline report (every stage's figures beside baselines)"
    )
    report.add_argument("--output", help="folder of index.html and its images (reports)")
    report.set_defaults(func=cmd_report)

    ui = sub.add_parser("ui", help="open the MLflow dashboard on the pipeline's runs")
    ui.add_argument("--host", default=DASHBOARD_HOST)
    ui.add_argument("--port", type=int, default=DASHBOARD_PORT)
    ui.set_defaults(func=cmd_ui)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
