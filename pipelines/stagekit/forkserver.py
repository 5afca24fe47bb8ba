"""Stages that start from an interpreter which has imported torch, MLflow and ONNX once.

Every stage is its own `python -m pipelines...` process, and on 2 CPUs a stage spent 3 to 6
s importing torch, MLflow, onnx/onnxscript, scikit-learn and Ray before its first line of
work (an export stage: 5.5 s of its 8.8; the demo runs 22 stages). `dlpipe run` therefore
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
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

SOCKET_ENV = "DLPIPE_FORKSERVER"
"""The server's socket, in the stages' environment (set by `preloaded_stages`)."""
SWITCH_ENV = "DLPIPE_PRELOAD"
"""0 (or off/false/no): stages start as plain interpreters; verbose: a stage that does
says why."""
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
UNRELATED_ENV = ("PATH", "PWD", "OLDPWD", "SHLVL", "_")
UNRELATED_PREFIXES = ("DVC_", "PYENV_")
"""Variables a stage's environment may differ in (with DVC's own and those pyenv's `python`
sets, which name its directory): none of them changes what an import does."""
STOP_GRACE_S = 10.0
"""How long a stage whose `python` died has, after SIGTERM, before SIGKILL."""

# The `python` first on the stages' PATH. Standard library only, and started isolated
# (-IS: no site, no user paths) so that it costs ~20 ms before it hands over.
SHIM = """#!{real} -IS
import json, os, signal, socket, struct, sys
REAL = {real!r}
SOCKET = {socket!r}
args = sys.argv[1:]
conn = None
pending = []  # signals that came before the stage did: passed on once it has
def pass_on(signum, frame):
    if conn is None:
        pending.append(signum)
        return
    try:
        conn.sendall(b"%d\\n" % signum)
    except OSError:
        pass
def fallback():
    if pending:  # told to stop before anything ran
        signal.signal(pending[0], signal.SIG_DFL)
        os.kill(os.getpid(), pending[0])
    os.execv(REAL, [REAL, *args])
if len(args) < 2 or args[0] != "-m" or not os.environ.get({socket_env!r}):
    fallback()
for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
    signal.signal(signum, pass_on)
try:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.connect(SOCKET)
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            pass
    umask = os.umask(0)
    os.umask(umask)
    request = json.dumps({{"argv": args, "cwd": os.getcwd(), "env": dict(os.environ),
                          "fds": fds, "umask": umask}}).encode()
    server.sendmsg([struct.pack("!I", len(request)) + request],
                   [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{{len(fds)}}i", *fds))])
    reader = server.makefile("r")
    answer = json.loads(reader.readline() or "{{}}")
except (OSError, ValueError):
    answer = {{}}
if not answer.get("accepted"):
    if answer.get("reason") and os.environ.get({switch_env!r}) == "verbose":
        print(f"dlpipe: a plain python runs this stage: {{answer['reason']}}", file=sys.stderr)
    fallback()  # (exec gives the signals their default actions back)
conn = server
for signum in [*pending]:
    pending.remove(signum)
    pass_on(signum, None)
try:
    end = json.loads(reader.readline() or "{{}}")
except (OSError, ValueError):
    end = {{}}
if "signal" in end:
    signal.signal(end["signal"], signal.SIG_DFL)
    os.kill(os.getpid(), end["signal"])
sys.exit(end.get("exit", 1))
"""


def enabled() -> bool:
    """Whether `dlpipe run` starts its stages from the fork server (DLPIPE_PRELOAD)."""
    return os.environ.get(SWITCH_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


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
    if not enabled() or real is None:
        yield env
        return
    with tempfile.TemporaryDirectory(prefix="dlpipe-stages-") as directory:
        address = os.path.join(directory, "server.sock")
        shim = Path(directory, "bin", "python")
        shim.parent.mkdir()
        shim.write_text(
            SHIM.format(real=real, socket=address, socket_env=SOCKET_ENV, switch_env=SWITCH_ENV)
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
    """Listen on `address`, import `preload`, then fork a stage for each accepted request.
    Returns only in a forked stage process: the request it is to run and its stdio."""
    own_env = dict(os.environ)  # what a stage's must match: the imports change it
    for name in preload:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
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
        try:
            request, fds = _receive(conn)
        except (OSError, ValueError):
            conn.close()
            continue
        reason = _declined(request, own_env, packages)
        if reason:
            _answer(conn, {"accepted": False, "reason": reason})
            conn.close()
            _close(fds)
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:  # the stage's supervisor
            listener.close()
            if _supervise(conn, fds):
                request["env"].update(imported_env)
                return request, fds  # in the stage itself
            os._exit(0)
        conn.close()
        _close(fds)
    return None


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    """One request (length-prefixed JSON) and the file descriptors that came with it."""
    fds = array.array("i")
    data, ancillary, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(3 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    (length,) = struct.unpack("!I", data[:4])
    body = data[4:]
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            raise ValueError("the request ended early")
        body += chunk
    request = json.loads(body)
    if not {"argv", "cwd", "env"} <= request.keys():
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
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)  # a group of its own: a signal reaches what the stage started
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
                _signal_group(pid, int(signum))
            if not data:  # its `python` was killed: the stage would run on, unseen
                watched = [exited]
                _signal_group(pid, signal.SIGTERM)
                kill_at = time.monotonic() + STOP_GRACE_S
        elif time.monotonic() >= kill_at:
            _signal_group(pid, signal.SIGKILL)
            kill_at = math.inf


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def become_stage(request: dict, fds: list[int]) -> None:
    """In the forked stage: take on the request's stdio, directory, environment, umask and
    argv, then run its module as `__main__`. Its exceptions and its exit are a fresh
    interpreter's: they leave this function for the interpreter's own ending."""
    targets = [0, 1, 2]
    for target, fd in zip(request.get("fds", targets), fds):
        if fd != target:
            os.dup2(fd, target)
            os.close(fd)
        targets.remove(target)
    for missing in targets:  # closed in the stage's `python`: /dev/null, as Python opens
        os.dup2(os.open(os.devnull, os.O_RDWR), missing)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[FORKED_ENV] = "1"
    os.umask(int(request.get("umask", 0o22)))
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    for stream in (sys.stdout, sys.stderr):
        # A terminal's lines are shown as written, a pipe's in blocks: as at start-up.
        stream.reconfigure(line_buffering=os.isatty(stream.fileno()), write_through=unbuffered)
    for signum in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if "numpy" in sys.modules:  # numpy's global generator is not reseeded by a fork
        sys.modules["numpy"].random.seed()
    module, *args = request["argv"][1:]
    # The project's own modules come from the stage's directory, as with `python -m`.
    top = module.split(".")[0]
    for name in [name for name in sys.modules if name == top or name.startswith(top + ".")]:
        del sys.modules[name]
    sys.path[0] = request["cwd"]
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


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
