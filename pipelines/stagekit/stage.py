"""Every stage's command line, from the stage function's own signature.

A stage module ends with

    if __name__ == "__main__":
        stage_command(train_supervised)

and `python -m pipelines.supervised.train --help` lists the options the function takes:

- a parameter annotated with a `Param` (e.g. `train: Annotated[TrainConfig, Param("train")]`)
  comes from `--params` (params.yaml by default), validated on load (pipelines/stagekit/config.py);
- every other parameter is an option named after it, less a `_dir` or `_path` suffix
  (`data_dir` -> `--data`, `metrics_path` -> `--metrics`), with the function's default
  (an option without a default is required).

A user mistake (UserError) prints one line `<stage>: error: ...` and exits 2, without a
traceback; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import logging
import sys
import typing
from collections.abc import Callable
from typing import Any

from pipelines.stagekit.config import declared_keys, load_params, stage_params
from pipelines.stagekit.errors import UserError

DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
"""OSErrors about the disk or the permissions of a path: one line, not a traceback."""

SUFFIXES = ("_dir", "_path")


def option_name(parameter: str) -> str:
    """`metrics_path` -> `metrics`, `registered_model` -> `registered-model`."""
    for suffix in SUFFIXES:
        parameter = parameter.removesuffix(suffix)
    return parameter.replace("_", "-")


def parser_for(function: Callable[..., Any], name: str) -> argparse.ArgumentParser:
    """The stage's argparse parser, built from `function`'s signature."""
    module = sys.modules.get(function.__module__)
    parser = argparse.ArgumentParser(
        prog=f"python -m {function.__module__}" if function.__module__ != "__main__" else name,
        description=module.__doc__ if module else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from_params = stage_params(function)
    if from_params:
        keys = ", ".join(declared_keys(function))
        parser.add_argument(
            "--params",
            default="params.yaml",
            help=f"the pipeline's params (default: %(default)s); reads {keys}",
        )
    parameters = [
        p for p in inspect.signature(function).parameters.values() if p.name not in from_params
    ]
    hints = typing.get_type_hints(function)
    for parameter in parameters:
        if hints.get(parameter.name) not in (str, str | None):
            # Every option arrives as text: a number or flag would need its own conversion.
            raise TypeError(
                f"{function.__name__}({parameter.name}): stage options are paths/names (str)"
            )
        flag = f"--{option_name(parameter.name)}"
        if parameter.default is inspect.Parameter.empty:
            parser.add_argument(flag, dest=parameter.name, metavar="VALUE", required=True)
        else:
            shown = "from params" if parameter.default is None else parameter.default
            parser.add_argument(
                flag,
                dest=parameter.name,
                metavar="VALUE",
                default=parameter.default,
                help=f"default: {shown}",
            )
    return parser


def stage_command(
    function: Callable[..., Any], argv: list[str] | None = None, name: str | None = None
) -> None:
    """Parse the command line for `function`, run it, and turn user mistakes into one line."""
    name = name or function.__name__
    args = vars(parser_for(function, name).parse_args(argv))

    def body() -> None:
        if "params" in args:
            args.update(load_params(function, args.pop("params")))
        function(**args)

    run_stage(name, body)


class _StageFormatter(logging.Formatter):
    """Progress lines as they are; a warning or worse says so first (`warning: ...`)."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


def run_stage(name: str, body: Callable[[], None]) -> None:
    """Run a stage body; user mistakes print `<name>: error: ...` and exit 2, without a traceback."""
    # Our progress at INFO; libraries (MLflow, onnxscript, Ray) only when something is wrong.
    handler = logging.StreamHandler()
    handler.setFormatter(_StageFormatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    # A stage runs as `python -m pipelines.<paradigm>.<stage>`: its own logger is `__main__`.
    for logger_name in ("pipelines", "__main__"):
        logging.getLogger(logger_name).setLevel(logging.INFO)
    try:
        body()
    except UserError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        # A full or read-only disk, or a path not ours to write, is the machine's state, not
        # a bug: one line naming the path. The atomic writers (stagekit/atomic.py) left the
        # earlier output in place.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{name}: error: {where}{exc.strerror}", file=sys.stderr)
        sys.exit(1)
