"""Stages that start from an interpreter which has imported torch, MLflow and ONNX once.

Every stage is its own `python -m pipelines...` process, and on 2 CPUs a stage spent 3 to 6
s importing torch, MLflow, onnx/onnxscript, scikit-learn and Ray before its first line of
work (an export stage: 5.5 s of its 8.8; the demo runs 25 stages). `dlpipe run` therefore
starts one fork server that imports those packages, and puts a `python` of its own first
on the stages' PATH. For `python -m <a project package>...` that `python` hands the
command to the server, which forks a copy of itself to run it: the same module as
`__main__`, the same argv, working directory, environment, stdin/stdout/stderr (the file
descriptors themselves, passed over a Unix socket), the same exit status; Ctrl-C and
SIGTERM reach the stage, and a stage whose `python` is killed is stopped. Anything else,
or when the server is gone or declines, and that `python` becomes the real interpreter
(exec), as if it had never been there: `dvc.yaml`'s commands and `dvc repro` without
`dlpipe run` are unchanged.

What a fork inherits is only what was imported: the server imports third-party packages
alone (the stage's own code is imported afresh in the fork, from its working directory),
and declines a stage whose environment differs from its own in anything but the
variables that cannot change an import (import-time settings such as OMP_NUM_THREADS
would otherwise be the server's). This is `multiprocessing`'s fork start method, which
PyTorch's DataLoader workers use after the same imports. DLPIPE_PRELOAD=0 turns it off.
"""

from __future__ import annotations

import array
import contextlib
import gc
import importlib
import json
import math
import os
import runpy
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

from pipelines.stagekit.stage_python import SOCKET_ENV, SWITCH_ENV

FORKED_ENV = "DLPIPE_PRELOADED"
"""Set to 1 in a stage's environment when it runs as a fork of the server."""

PRELOAD = (
    "numpy",
    "yaml",
    "torch",
    "onnx",
    "onnxscript",
    "torch.onnx._internal.exporter._core",  # what the first torch.onnx.export imports
    "mlflow",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "sklearn.metrics",
    "ray",
    "ray.train.torch",
)
"""Imported once by the server: the packages most stages import (measured 7.2 s in all on
2 CPUs). A missing one is skipped."""
PACKAGES = ("pipelines",)
"""The top-level packages whose `python -m` commands the server runs."""
UNRELATED_ENV = ("PATH", "PWD", "OLDPWD", "SHLVL", "_", "PYTHONUNBUFFERED")
UNRELATED_PREFIXES = ("DVC_", "PYENV_")
"""Variables a stage's environment may differ in (with DVC's own and those pyenv's `python`
sets, which name its directory): none of them changes what an import does, and a stage's
PYTHONUNBUFFERED is applied to its stdio (`become_stage`)."""
REQUEST_TIMEOUT_S = 10.0
"""How long the server waits for a request it has accepted the connection of."""
STOP_GRACE_S = 10.0
"""How long a stage whose `python` died has, after SIGTERM, before SIGKILL."""

# The `python` first on the stages' PATH: the real interpreter running stage_python.py,
# isolated (-IS: no site, no user paths; ~20 ms before it hands over). A shell script, so
# that neither path has to fit in a `#!` line.
SHIM = """#!/bin/sh
exec {real} -IS {client} {socket} "$@"
"""
CLIENT = Path(__file__).with_name("stage_python.py")


def enabled(env: dict[str, str]) -> bool:
    """Whether `dlpipe run` starts its stages from the fork server (DLPIPE_PRELOAD)."""
    return env.get(SWITCH_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


@contextlib.contextmanager
def preloaded_stages(
    env: dict[str, str], packages: tuple[str, ...] = PACKAGES, preload: tuple[str, ...] = PRELOAD
) -> Iterator[dict[str, str]]:
    """The fork server for the stages of one command: yields `env` with the `python` that
    hands stages to it first on PATH (`env` itself when DLPIPE_PRELOAD=0 or no `python`
    is on PATH); stops the server on the way out. The server imports while the command
    goes on: the stages that start before it listens (its socket exists) run as plain
    interpreters."""
    real = shutil.which("python", path=env.get("PATH"))
    if not enabled(env) or real is None:
        yield env
        return
    real = os.path.abspath(real)  # the server starts elsewhere: a relative PATH entry
    with tempfile.TemporaryDirectory(prefix="dlpipe-stages-") as directory:
        address = os.path.join(directory, "server.sock")
        shim = Path(directory, "bin", "python")
        shim.parent.mkdir()
        shim.write_text(
            SHIM.format(
                real=shlex.quote(real), client=shlex.quote(str(CLIENT)), socket=shlex.quote(address)
            )
        )
        shim.chmod(0o755)
        stage_env = {**env, "PATH": f"{shim.parent}{os.pathsep}{env.get('PATH', '')}"}
        stage_env[SOCKET_ENV] = address
        server = subprocess.Popen(
            [real, "-m", __name__, "--socket", address, "--preload", ",".join(preload), *packages],
            env=stage_env,
            # Where `pipelines` imports from, installed or checked out; the stages' own
            # working directory is theirs.
            cwd=Path(__file__).resolve().parents[2],
            start_new_session=True,  # the terminal's Ctrl-C reaches stages through their `python`
            stdin=subprocess.DEVNULL,
        )
        try:
            yield stage_env
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def serve(
    address: str, packages: tuple[str, ...], preload: tuple[str, ...] = PRELOAD
) -> tuple[dict, list[int]] | None:
    """Import `preload`, then listen on `address` and fork a stage for each accepted
    request. Returns only in a forked stage process: the request it is to run and its
    stdio. Returns None at once where forking stages would not be safe."""
    own_env = dict(os.environ)  # what a stage's must match: the imports change it
    own_path = sys.path[0]  # (`import ray` puts its own folder before it)
    for name in preload:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    if not _fork_safe():
        return None
    gc.freeze()  # the imports' objects: never collected, so their pages stay shared
    # Set by the imports (torch's KMP_INIT_AT_FORK, MLflow's session id, ...): a stage
    # that imported them itself would have them.
    imported_env = {k: v for k, v in os.environ.items() if own_env.get(k) != v}
    # Only now: a stage that comes while the imports run starts as a plain interpreter
    # (its own imports are at most these) instead of waiting for all of them.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(64)
    parent = os.getppid()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the supervisors are reaped unwaited
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while os.getppid() == parent:  # `dlpipe run` killed: the server goes too
        if not select.select([listener], [], [], 1.0)[0]:
            continue
        conn, _ = listener.accept()
        fds: list[int] = []
        try:
            conn.settimeout(REQUEST_TIMEOUT_S)  # a `python` that stalls holds up no other
            request, fds = _receive(conn)
            reason = _declined(request, own_env, packages)
        except Exception as exc:  # a bad request costs its own stage the preload, no more
            request, reason = {}, f"unreadable request ({exc})"
        if reason:
            _answer(conn, {"accepted": False, "reason": reason})
            conn.close()
            _close(fds)
            continue
        conn.settimeout(None)
        sys.stdout.flush()
        sys.stderr.flush()
        if _fork() == 0:  # the stage's supervisor
            listener.close()
            in_stage = False
            try:
                in_stage = _supervise(conn, fds)
            finally:
                if not in_stage:  # the supervisor, whatever happened: never the server's code
                    os._exit(0)
            request["env"].update(imported_env)
            request["path"] = own_path
            return request, fds
        conn.close()
        _close(fds)
    return None


def _fork_safe() -> bool:
    """Whether stages may start as forks of this process: on Linux (pidfd_open), and only
    while no import has started CUDA, which a forked process cannot use."""
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):  # not Linux, or a kernel before 5.3
        return False
    torch = sys.modules.get("torch")
    return torch is None or not torch.cuda.is_initialized()


def _fork() -> int:
    # Python 3.12+ warns at every fork of a process with threads: here the imports' native
    # pools (OpenBLAS, jemalloc), which handle fork, as PyTorch's DataLoader workers rely on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*fork.*", DeprecationWarning)
        return os.fork()


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """One request (length-prefixed JSON) and the file descriptors that came with it."""
    fds = array.array("i")
    data, ancillary, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if len(fds) != 3 or len(data) < 4:
        _close(list(fds))
        raise ValueError("a request comes with stdin, stdout and stderr")
    (length,) = struct.unpack("!I", data[:4])
    body = data[4:]
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            _close(list(fds))
            raise ValueError("the request ended early")
        body += chunk
    request = json.loads(body)
    if not {"argv", "cwd", "env"} <= request.keys():
        _close(list(fds))
        raise ValueError("a request names argv, cwd and env")
    return request, list(fds)


def _declined(request: dict, own_env: dict[str, str], packages: tuple[str, ...]) -> str:
    """Why the server will not run `request` ('' when it will)."""
    module = request["argv"][1]
    if module.split(".")[0] not in packages:
        return f"{module} is not in {', '.join(packages)}"
    env = request["env"]
    differ = sorted(
        key
        for key in set(env) | set(own_env)
        if env.get(key) != own_env.get(key)
        and key not in UNRELATED_ENV
        and not key.startswith(UNRELATED_PREFIXES)
    )
    return f"environment differs: {', '.join(differ)}" if differ else ""


def _answer(conn: socket.socket, message: dict) -> None:
    with contextlib.suppress(OSError):
        conn.sendall(json.dumps(message).encode() + b"\n")


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _supervise(conn: socket.socket, fds: list[int]) -> bool:
    """In a supervisor: fork the stage (returns True there), then pass on the signals its
    `python` sends, and answer with how the stage ended. Returns False when it has."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    pid = _fork()
    if pid == 0:
        with contextlib.suppress(OSError):  # a group of its own: signals reach its children
            os.setpgid(0, 0)
        conn.close()
        return True
    with contextlib.suppress(OSError):  # also here: a signal may come before the stage's own
        os.setpgid(pid, pid)
    _close(fds)  # the stage's stdio: a pipe's reader sees its end when the stage's ends
    _answer(conn, {"accepted": True, "pid": pid})
    exited = os.pidfd_open(pid)
    watched = [conn, exited]
    kill_at = math.inf
    while True:
        timeout = None if kill_at == math.inf else max(kill_at - time.monotonic(), 0.0)
        ready = select.select(watched, [], [], timeout)[0]
        if exited in ready:
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status):
                _answer(conn, {"signal": os.WTERMSIG(status)})
            else:
                _answer(conn, {"exit": os.waitstatus_to_exitcode(status)})
            return False
        if conn in ready:
            data = b""
            with contextlib.suppress(OSError):
                data = conn.recv(64)
            for signum in data.split():
                with contextlib.suppress(ValueError):
                    _signal_group(pid, int(signum))
            if not data:  # its `python` was killed: the stage would run on, unseen
                watched = [exited]
                _signal_group(pid, signal.SIGTERM)
                kill_at = time.monotonic() + STOP_GRACE_S
        elif time.monotonic() >= kill_at:
            _signal_group(pid, signal.SIGKILL)
            kill_at = math.inf


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
        os.killpg(pgid, signum)


def become_stage(request: dict, fds: list[int]) -> None:
    """In the forked stage: take on the request's stdio, directory, environment, umask and
    argv, then run its module as `python -m` does, as `__main__`. Its exceptions and its
    exit are a fresh interpreter's: they leave this function for the interpreter's own
    ending."""
    for target, fd in enumerate(fds):
        if fd != target:
            os.dup2(fd, target)
            os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[FORKED_ENV] = "1"
    os.umask(int(request.get("umask", 0o22)))
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    # As at start-up: stdout line by line to a terminal and in blocks to a pipe, stderr
    # line by line to either, both at once with PYTHONUNBUFFERED.
    sys.stdout.reconfigure(line_buffering=os.isatty(1), write_through=unbuffered)
    sys.stderr.reconfigure(line_buffering=True, write_through=unbuffered)
    for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if "numpy" in sys.modules:  # numpy's global generator is not reseeded by a fork
        sys.modules["numpy"].random.seed()
    module = request["argv"][1]
    # The project's own modules come from the stage's directory, as with `python -m`:
    # its folder where the server's was on the path, and none of the server's imported.
    top = module.split(".")[0]
    for name in [name for name in sys.modules if name == top or name.startswith(top + ".")]:
        del sys.modules[name]
    own_path = request.get("path")
    sys.path[sys.path.index(own_path) if own_path in sys.path else 0] = request["cwd"]
    sys.argv = request["argv"][1:]
    # A `__main__` of its own for the whole life of the process (pickling by reference,
    # atexit handlers), run as the interpreter's own `-m` runs it.
    sys.modules["__main__"] = types.ModuleType("__main__")
    runpy._run_module_as_main(module, alter_argv=True)  # what the interpreter's `-m` calls


def main(argv: list[str] | None = None) -> None:
    """`python -m pipelines.stagekit.forkserver --socket PATH PACKAGE...` (started by
    `preloaded_stages`)."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--preload", default=",".join(PRELOAD), help="modules, comma-separated")
    parser.add_argument("packages", nargs="+")
    args = parser.parse_args(argv)
    stage = serve(args.socket, tuple(args.packages), tuple(filter(None, args.preload.split(","))))
    if stage is not None:
        become_stage(*stage)


if __name__ == "__main__":
    main()
