"""What every stage's `main` shares: turning a UserError into one clear line and exit code 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from pipelines.errors import UserError


def run_stage(name: str, body: Callable[[], None]) -> None:
    """Run a stage body; user mistakes print `<name>: error: ...` and exit 2, without a traceback."""
    # Our progress at INFO; libraries (MLflow, onnxscript, Ray) only when something is wrong.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # A stage runs as `python -m pipelines.<stage>`, so its own logger is `__main__`.
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
