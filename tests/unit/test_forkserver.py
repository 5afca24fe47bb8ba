"""`dlpipe run`'s fork server: a `python -m` stage started as a fork of an interpreter that
has already imported its packages behaves as a fresh interpreter would. Real processes
(the server, its `python`, the stages) on a temporary project; `decimal` stands in for
torch & co. as what is imported once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.stagekit.forkserver import FORKED_ENV, SOCKET_ENV, SWITCH_ENV, preloaded_stages

SHOW = """\
import json, os, sys
seen = {
    "argv": sys.argv[1:],
    "cwd": os.getcwd(),
    "forked": os.environ.get("DLPIPE_PRELOADED"),
    "preloaded": "decimal" in sys.modules,
    "stage": os.environ.get("DVC_STAGE"),
    "path0": sys.path[0],
    "pid": os.getpid(),
}
if "--stdin" in sys.argv:
    seen["stdin"] = sys.stdin.read()
if "--sleep" in sys.argv:
    import time
    try:
        print(json.dumps(seen), flush=True)
        time.sleep(60)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        raise
if "--path" in sys.argv:
    seen["path"] = sys.path
print(json.dumps(seen), flush=True)
if "--warn-then-killed" in sys.argv:  # stderr, unflushed, then the OOM killer
    sys.stderr.write("a warning before the end\\n")
    os.kill(os.getpid(), 9)
if "--pickle-at-exit" in sys.argv:
    import atexit, pickle

    def task():
        pass

    atexit.register(lambda: print("pickled", len(pickle.dumps(task)) > 0, flush=True))
if "--fail" in sys.argv:
    raise RuntimeError("the stage failed")
if "--exit" in sys.argv:
    sys.exit(int(sys.argv[-1]))
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project whose stages are `python -m stagepkg.show ...`."""
    (tmp_path / "stagepkg").mkdir()
    (tmp_path / "stagepkg" / "__init__.py").write_text("")
    (tmp_path / "stagepkg" / "show.py").write_text(SHOW)
    return tmp_path


def _venv_env() -> dict[str, str]:
    """This environment with this virtualenv's `python` first on PATH, preloading on."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop(SWITCH_ENV, None)
    return env


def _listening(env: dict[str, str]) -> dict[str, str]:
    """`env` once its server listens (after its imports)."""
    deadline = time.monotonic() + 30
    while not os.path.exists(env[SOCKET_ENV]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return env


@pytest.fixture
def stage_env(project: Path):
    """The environment `dlpipe run` gives its stages."""
    with preloaded_stages(_venv_env(), packages=("stagepkg",), preload=("decimal",)) as env:
        yield _listening(env)


def _stage(project: Path, env: dict[str, str], *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        ["python", "-m", "stagepkg.show", *args],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def _module_output(cwd: Path, env: dict[str, str], module: str) -> str:
    """What `python -m module` printed (it must succeed)."""
    result = subprocess.run(
        ["python", "-m", module], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _run(project: Path, env: dict[str, str], *args: str, stdin: str = "") -> tuple[int, dict, str]:
    process = _stage(project, env, *args, stdin=subprocess.PIPE)
    out, err = process.communicate(stdin, timeout=60)
    return process.returncode, json.loads(out.splitlines()[0]), err


def test_a_stage_runs_as_a_fork_with_its_own_argv_directory_environment_and_stdio(
    project, stage_env
):
    env = {**stage_env, "DVC_STAGE": "show"}  # what DVC adds to the stages' environment
    code, seen, _ = _run(project, env, "a b", "--stdin", stdin="rows\n")
    assert code == 0
    assert seen["forked"] == "1" and seen["preloaded"]  # imported by the server, not the stage
    assert seen["argv"] == ["a b", "--stdin"]
    assert seen["cwd"] == str(project) and seen["path0"] == str(project)
    assert seen["stage"] == "show"
    assert seen["stdin"] == "rows\n"


def test_exit_codes_and_tracebacks_are_a_fresh_interpreters(project, stage_env):
    code, seen, _ = _run(project, stage_env, "--exit", "3")
    assert (code, seen["forked"]) == (3, "1")
    code, _, err = _run(project, stage_env, "--fail")
    assert code == 1
    assert "RuntimeError: the stage failed" in err


def test_ctrl_c_reaches_the_stage_and_its_python_ends_as_the_stage_did(project, stage_env):
    process = _stage(project, stage_env, "--sleep")
    seen = json.loads(process.stdout.readline())
    assert seen["forked"] == "1"
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert "interrupted" in out and "KeyboardInterrupt" in err
    assert process.returncode == -signal.SIGINT


def test_a_stage_whose_python_is_killed_is_stopped(project, stage_env):
    process = _stage(project, stage_env, "--sleep")
    pid = json.loads(process.stdout.readline())["pid"]
    process.kill()
    process.wait()
    deadline = time.monotonic() + 15
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return status != "Z"


def test_an_import_time_setting_that_differs_gets_a_plain_interpreter(project, stage_env):
    code, seen, _ = _run(project, {**stage_env, "OMP_NUM_THREADS": "7"}, "x")
    assert code == 0
    assert seen["forked"] is None and not seen["preloaded"]
    assert seen["argv"] == ["x"]


def test_other_commands_and_a_gone_server_get_the_plain_interpreter(project, stage_env):
    plain = subprocess.run(
        ["python", "-c", f"import os; print(os.environ.get('{FORKED_ENV}'))"],
        env=stage_env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert plain.stdout.strip() == "None"
    os.remove(stage_env[SOCKET_ENV])  # the server's address gone: nothing answers there
    code, seen, _ = _run(project, stage_env, "y")
    assert (code, seen["forked"], seen["argv"]) == (0, None, ["y"])


def test_the_projects_own_modules_come_from_the_stages_directory(tmp_path):
    # The server itself runs from dlpipe's `pipelines` package; a stage of a project whose
    # package has the same name imports that project's.
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "__init__.py").write_text("")
    (tmp_path / "pipelines" / "own.py").write_text(
        "import os, pipelines; print(os.environ.get('DLPIPE_PRELOADED'), pipelines.__file__)"
    )
    with preloaded_stages(_venv_env(), preload=("decimal",)) as env:
        printed = _module_output(tmp_path, _listening(env), "pipelines.own").split()
    assert printed == ["1", str(tmp_path / "pipelines" / "__init__.py")]


def test_dlpipe_preload_0_leaves_the_environment_as_it_is():
    env = {"PATH": os.environ["PATH"], SWITCH_ENV: "0"}
    with preloaded_stages(env) as ready:
        assert ready == env


def test_what_the_imports_set_in_the_environment_is_the_stages_too(project):
    # torch sets KMP_INIT_AT_FORK on import, MLflow a session id: the server's environment
    # after its imports is not the one a stage's is compared with, but the stage has them.
    (project / "sets_env.py").write_text("import os\nos.environ['SET_BY_IMPORT'] = 'yes'\n")
    (project / "stagepkg" / "env.py").write_text(
        "import os; print(os.environ.get('DLPIPE_PRELOADED'), os.environ.get('SET_BY_IMPORT'))"
    )
    env = {**_venv_env(), "PYTHONPATH": str(project)}
    with preloaded_stages(env, packages=("stagepkg",), preload=("sets_env",)) as started:
        printed = _module_output(project, _listening(started), "stagepkg.env").split()
    assert printed == ["1", "yes"]


def test_stderr_is_line_buffered_and_a_killed_stage_ends_its_python_the_same_way(
    project, stage_env
):
    code, seen, err = _run(project, stage_env, "--warn-then-killed")
    assert seen["forked"] == "1"
    assert "a warning before the end" in err  # written before the kill, as by python
    assert code == -signal.SIGKILL


def test_pythonunbuffered_and_a_closed_stdin(project, stage_env):
    # `dlpipe run --jobs` sets PYTHONUNBUFFERED for its stages' lines: still forked.
    code, seen, _ = _run(project, {**stage_env, "PYTHONUNBUFFERED": "1"}, "x")
    assert (code, seen["forked"]) == (0, "1")
    # With stdin closed the stage gets a plain interpreter, whose own stdin is closed too.
    closed = subprocess.run(
        ["sh", "-c", "exec python -m stagepkg.show y <&-"],
        cwd=project,
        env=stage_env,
        capture_output=True,
        text=True,
        check=True,
    )
    seen = json.loads(closed.stdout)
    assert seen["forked"] is None and seen["argv"] == ["y"]


def test_main_outlives_the_module_and_a_dropped_request_harms_no_other(project, stage_env):
    import socket

    dropped = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dropped.connect(stage_env[SOCKET_ENV])  # a `python` killed before it asked anything
    dropped.close()
    process = _stage(project, stage_env, "--pickle-at-exit")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert json.loads(out.splitlines()[0])["forked"] == "1"
    assert out.splitlines()[-1] == "pickled True"  # `__main__.task`, found at exit


def test_the_stages_path_is_a_plain_interpreters_after_ray_put_its_own_first(project):
    # `import ray` puts its vendored folder first on sys.path: the stage's directory takes
    # the server's place behind it, as in a plain `python -m`.
    (project / "stagepkg" / "path.py").write_text(
        "import json, os, sys, ray\n"
        "print(json.dumps([os.environ.get('DLPIPE_PRELOADED'), sys.path]))\n"
    )
    with preloaded_stages(_venv_env(), packages=("stagepkg",), preload=("ray",)) as env:
        forked, path = json.loads(_module_output(project, _listening(env), "stagepkg.path"))
        plain, plain_path = json.loads(
            _module_output(project, {**env, "OMP_NUM_THREADS": "3"}, "stagepkg.path")
        )
    assert (forked, plain) == ("1", None)
    assert path == plain_path
