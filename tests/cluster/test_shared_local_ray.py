"""`dlpipe run`: the stages of one repro join one local Ray instance, which goes with it.

Here, not in tests/integration: the command starts a Ray instance of its own, which must
not meet the session cluster there."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO, run_command

STAGE_SCRIPT = """\
import json, os, sys, time
import ray
from pipelines.training.cluster import connect_ray, joined_cluster

connect_ray()
seen = {"gcs": ray.get_runtime_context().gcs_address, "joined": joined_cluster()}
seen["pid"] = os.getpid()
with open(sys.argv[1], "w") as out:
    json.dump(seen, out)
if len(sys.argv) > 2:  # a stage still running when dlpipe run is told to stop
    time.sleep(float(sys.argv[2]))
"""


# A test run in the background may ignore SIGINT, and dlpipe run would inherit that: its
# command is exec'd with SIGINT's default action back.
DEFAULT_SIGINT_EXEC = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def _pipeline(root: Path, first_sleeps_s: float = 0) -> None:
    """Two stages, the second after the first, each recording the Ray it connected to."""
    (root / "stage.py").write_text(STAGE_SCRIPT)
    sleeps = {"first": f" {first_sleeps_s:g}" if first_sleeps_s else "", "second": ""}
    stages = {
        name: {
            "cmd": f"python stage.py {name}.json{sleeps[name]}",
            "deps": ["stage.py", *after],
            "outs": [{f"{name}.json": {"cache": False}}],
        }
        for name, after in (("first", []), ("second", ["first.json"]))
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))


def _repository(root: Path, first_sleeps_s: float = 0) -> tuple[str, dict[str, str]]:
    """A DVC repository of the two stages; the virtualenv's bin folder and environment."""
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    subprocess.run([f"{bin_dir}/dvc", "init", "--no-scm", "-q"], cwd=root, env=env, check=True)
    _pipeline(root, first_sleeps_s)
    return bin_dir, env


def _refused(gcs_address: str) -> bool:
    host, port = gcs_address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def test_the_stages_of_one_run_share_a_local_ray_that_stops_with_it(tmp_path):
    bin_dir, env = _repository(tmp_path)

    run = run_command([f"{bin_dir}/dlpipe", "run"], tmp_path, env, timeout_s=300)
    assert run.returncode == 0, run.stdout + run.stderr
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("first", "second"))
    assert first["gcs"] == second["gcs"]
    # A local instance: a setting asking for more CPUs than it has fails at once, as with
    # a stage's own Ray, rather than waiting for an autoscaler.
    assert first["joined"] is False and second["joined"] is False
    assert _refused(first["gcs"])  # the instance stopped with the command

    again = run_command([f"{bin_dir}/dlpipe", "run"], tmp_path, env, timeout_s=120)
    assert again.returncode == 0 and "up to date" in again.stdout + again.stderr
    assert json.loads((tmp_path / "first.json").read_text()) == first  # nothing re-ran


def test_a_run_given_ray_address_adds_no_instance_of_its_own(monkeypatch):
    from pipelines.training.cluster import local_ray_for_stages

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # never reached: nothing connects
    with local_ray_for_stages() as ray_env:
        assert ray_env == {}


@pytest.mark.parametrize(
    ("signum", "jobs"), [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGINT, 2)]
)
def test_a_signal_to_dlpipe_run_alone_stops_the_stage_before_its_ray(tmp_path, signum, jobs):
    """`kill` or a service manager reaches `dlpipe run` alone, not the stage: the stage must
    stop too (not run on orphaned, nor wait for ever), and Ray only once it has."""
    bin_dir, env = _repository(tmp_path, first_sleeps_s=120)
    run, seen = _run_until_first_records(tmp_path, [f"{bin_dir}/dlpipe", "run", f"-j{jobs}"], env)
    run.send_signal(signum)
    _assert_stopped_before_its_ray(tmp_path, run, seen)


def _run_until_first_records(
    root: Path, command: list[str], env: dict[str, str]
) -> tuple[subprocess.Popen, dict]:
    """`command` started in `root`, once the stage `first` has written first.json (what
    it saw), while the stage sleeps."""
    run = subprocess.Popen(
        [sys.executable, "-c", DEFAULT_SIGINT_EXEC, *command],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen_file = root / "first.json"
    deadline = time.monotonic() + 180
    while not seen_file.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert seen_file.exists(), run.communicate(timeout=60)[0]
    time.sleep(0.5)  # the file is written whole before the stage sleeps
    return run, json.loads(seen_file.read_text())


def _assert_stopped_before_its_ray(root: Path, run: subprocess.Popen, seen: dict) -> str:
    """The run, told to stop, failed; the stage went, then its Ray; `second` never ran.
    Returns the run's output."""
    output, _ = run.communicate(timeout=60)
    assert run.returncode != 0, output
    for _ in range(50):  # the stage, reparented once DVC went, is reaped by init
        if not Path(f"/proc/{seen['pid']}").exists():
            break
        time.sleep(0.2)
    assert not Path(f"/proc/{seen['pid']}").exists(), f"the stage still runs\n{output}"
    assert _refused(seen["gcs"]), output
    assert not (root / "second.json").exists()
    return output


# A stage of this repository's kind, `python -m pipelines...`: a project package named as
# dlpipe's, with dlpipe's own modules behind it.
PROBE_STAGE = """\
import json, os, sys, time
preloaded = "torch" in sys.modules  # before the stage imports anything itself
import ray
from pipelines.training.cluster import connect_ray, joined_cluster

connect_ray()
seen = {"gcs": ray.get_runtime_context().gcs_address, "joined": joined_cluster()}
seen.update(pid=os.getpid(), forked=os.environ.get("DLPIPE_PRELOADED"), preloaded=preloaded)
with open(sys.argv[1], "w") as out:
    json.dump(seen, out)
time.sleep(float(sys.argv[2]))
"""
# The server listens once its imports are done; a stage that came first would start as a
# plain interpreter (as it may in a real run), so the probe waits for it.
WAIT_FOR_SERVER = """\
import os, time
deadline = time.monotonic() + 120
while not os.path.exists(os.environ["DLPIPE_FORKSERVER"]) and time.monotonic() < deadline:
    time.sleep(0.05)
"""


def test_a_stage_forked_from_the_preloaded_interpreter_joins_the_ray_and_stops_with_it(
    tmp_path,
):
    bin_dir, env = _repository(tmp_path)
    env.pop("DLPIPE_PRELOAD", None)
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "__init__.py").write_text(
        f"__path__.append({str(REPO / 'pipelines')!r})\n"
    )
    (tmp_path / "pipelines" / "probe.py").write_text(PROBE_STAGE)
    (tmp_path / "wait.py").write_text(WAIT_FOR_SERVER)
    stages = {
        "first": {
            "cmd": ["python wait.py", "python -m pipelines.probe first.json 120"],
            "deps": ["wait.py", "pipelines"],
            "outs": [{"first.json": {"cache": False}}],
        },
        "second": {
            "cmd": "python stage.py second.json",
            "deps": ["first.json"],
            "outs": [{"second.json": {"cache": False}}],
        },
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))

    run, seen = _run_until_first_records(tmp_path, [f"{bin_dir}/dlpipe", "run"], env)
    assert seen["forked"] == "1" and seen["preloaded"]  # torch came imported
    assert seen["joined"] is False and seen["gcs"]  # the run's own local Ray
    run.send_signal(signal.SIGINT)
    output = _assert_stopped_before_its_ray(tmp_path, run, seen)
    assert "KeyboardInterrupt" in output  # the stage's own, through its `python`


TIMED_STAGE = """\
import json, os, sys, time
started = time.time()
time.sleep(float(sys.argv[2]))
if sys.argv[3:] == ["fail"]:
    sys.exit(3)
with open(sys.argv[1], "w") as out:
    json.dump({"start": started, "end": time.time(), "ray": os.environ.get("RAY_ADDRESS")}, out)
"""


def _fan_in(root: Path, left_fails: bool = False) -> None:
    """`left` and `right` independent (4 s each), `joined` after both."""
    (root / "timed.py").write_text(TIMED_STAGE)
    fail = " fail" if left_fails else ""
    stages = {
        "left": {"cmd": f"python timed.py left.json 4{fail}", "deps": ["timed.py"]},
        "right": {"cmd": "python timed.py right.json 4", "deps": ["timed.py"]},
        "joined": {"cmd": "python timed.py joined.json 0", "deps": ["left.json", "right.json"]},
    }
    for name, stage in stages.items():
        stage["outs"] = [{f"{name}.json": {"cache": False}}]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))


def test_jobs_runs_independent_stages_side_by_side_and_dependents_after(tmp_path):
    bin_dir, env = _repository(tmp_path)
    _fan_in(tmp_path)

    run = run_command([f"{bin_dir}/dlpipe", "run", "--jobs", "2"], tmp_path, env, timeout_s=300)
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    left, right, joined = (
        json.loads((tmp_path / f"{n}.json").read_text()) for n in ("left", "right", "joined")
    )
    assert left["start"] < right["end"] and right["start"] < left["end"], output  # overlap
    assert joined["start"] >= max(left["end"], right["end"])
    assert left["ray"] == right["ray"] == joined["ray"] and left["ray"], output  # one Ray
    assert "left | Running stage 'left'" in output  # each line names its stage
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"left", "right", "joined"}  # DVC recorded every stage
    assert _refused(left["ray"])

    again = run_command([f"{bin_dir}/dlpipe", "run", "-j", "2"], tmp_path, env, timeout_s=120)
    assert again.returncode == 0 and "nothing to run" in again.stdout, again.stdout


def test_jobs_after_a_failed_stage_starts_nothing_that_needs_it(tmp_path):
    bin_dir, env = _repository(tmp_path)
    _fan_in(tmp_path, left_fails=True)

    run = run_command([f"{bin_dir}/dlpipe", "run", "--jobs", "2"], tmp_path, env, timeout_s=300)
    output = run.stdout + run.stderr
    assert run.returncode != 0, output
    assert "failed: the chain left; not run: joined" in output
    assert (tmp_path / "right.json").exists() and not (tmp_path / "joined.json").exists()
    lock = yaml.safe_load((tmp_path / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"right"}  # what succeeded is recorded, as dvc repro would
