"""The `python` first on the PATH of `dlpipe run`'s stages (pipelines/stagekit/forkserver.py).

Run as `REAL -IS stage_python.py SOCKET ARGS...` by a two-line shell script named `python`:
the real interpreter, isolated and without `site` (standard library only, ~20 ms), so it
imports nothing of the project. `python -m MODULE ...` goes to the fork server at SOCKET
with this process's directory, environment, umask and stdin/stdout/stderr; this process
then passes on the signals it gets and ends as the stage ended. Anything else, or when the
server is not there or declines, and this process becomes the real interpreter (exec).
"""

import io
import json
import os
import signal
import socket
import struct
import sys

SOCKET_ENV = "DLPIPE_FORKSERVER"
"""The fork server's socket, in the stages' environment (forkserver.preloaded_stages)."""
SWITCH_ENV = "DLPIPE_PRELOAD"
"""0 (or off/false/no): `dlpipe run`'s stages start as plain interpreters; verbose: a stage
that does says why."""
PASSED_ON = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
"""What reaches the stage through this process (a batch system's warning signals too)."""


def main(address: str, args: list[str]) -> None:
    if len(args) < 2 or args[0] != "-m" or not os.environ.get(SOCKET_ENV):
        become_python(args)
    std_open = True
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            std_open = False
    if not std_open:  # (a socket opened now would take the closed descriptor's number)
        become_python(args)
    pending: list[int] = []
    server: socket.socket | None = None

    def pass_on(signum: int, frame: object) -> None:
        if server is None:  # the stage has not started: passed on when it has
            pending.append(signum)
            return
        try:
            server.sendall(b"%d\n" % signum)
        except OSError:
            pass

    for signum in PASSED_ON:
        signal.signal(signum, pass_on)
    answer, connection, reader = ask(address, args)
    if not answer.get("accepted") or connection is None or reader is None:
        if answer.get("reason") and os.environ.get(SWITCH_ENV) == "verbose":
            print(f"dlpipe: a plain python runs this stage: {answer['reason']}", file=sys.stderr)
        if pending:  # told to stop before anything ran
            end_by_signal(pending[0])
        become_python(args)
    server = connection
    for signum in pending:
        pass_on(signum, None)
    try:
        end = json.loads(reader.readline() or "{}")
    except (OSError, ValueError):
        end = {}
    if "signal" in end:
        end_by_signal(end["signal"])
    sys.exit(end.get("exit", 1))


def ask(
    address: str, args: list[str]
) -> tuple[dict, socket.socket | None, io.TextIOWrapper | None]:
    """The server's answer to running `args` ({} when there is no server to ask), the
    connection, and its reader (which may already hold how the stage ended)."""
    umask = os.umask(0)
    os.umask(umask)
    request = json.dumps(
        {"argv": args, "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask}
    ).encode()
    try:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.connect(address)
        connection.sendmsg(
            [struct.pack("!I", len(request)) + request],
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", 0, 1, 2))],
        )
        reader = connection.makefile("r")
        return json.loads(reader.readline() or "{}"), connection, reader
    except (OSError, ValueError):
        return {}, None, None


def become_python(args: list[str]) -> None:
    """Exec the real interpreter on `args` (its signals get their default actions back)."""
    os.execv(sys.executable, [sys.executable, *args])


def end_by_signal(signum: int) -> None:
    """End as a process killed by `signum` does (SIGKILL's action cannot be set)."""
    if signum not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    sys.exit(128 + signum)  # a signal whose default action is not to end


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
