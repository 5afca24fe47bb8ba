"""`dlpipe`: one console script for the pipeline and its models.

dlpipe run [STAGE ...]    re-run what changed (dvc repro), up to STAGE
dlpipe ui                 open the MLflow dashboard
dlpipe serve ...          serve, reload and query the models (serving/cli.py)
dlpipe predict IMAGE ...  classify images through a running server (serving/cli.py)
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipelines.stagekit.tracking import tracking_uri
from serving import cli as serving_cli


def cmd_run(args: argparse.Namespace) -> int:
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    command = [dvc, "repro", *(["--force"] if args.force else []), *args.stages]
    print("$", " ".join(["dvc", *command[1:]]), flush=True)
    return subprocess.call(command)


def cmd_ui(args: argparse.Namespace) -> int:
    uri = tracking_uri()
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    print(f"MLflow dashboard for {uri} at http://{args.host}:{args.port}", flush=True)
    os.execv(
        mlflow,
        [mlflow, "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)],
    )
    return 0  # not reached


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="dlpipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = top.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="re-run changed pipeline stages (dvc repro)")
    run.add_argument("stages", nargs="*", help="stage names from dvc.yaml (default: all)")
    run.add_argument("--force", action="store_true", help="re-run even if nothing changed")
    run.set_defaults(func=cmd_run)

    serving_cli.add_commands(sub)

    ui = sub.add_parser("ui", help="open the MLflow dashboard on the pipeline's runs")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
