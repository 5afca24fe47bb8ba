"""`dlpipe run`: the stages of one repro join one local Ray instance, which goes with it.

Here, not in tests/integration: the command starts a Ray instance of its own, which must
not meet the session cluster there."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import run_command

STAGE_SCRIPT = """\
import json, sys
import ray
from pipelines.training.cluster import connect_ray, joined_cluster

connect_ray()
seen = {"gcs": ray.get_runtime_context().gcs_address, "joined": joined_cluster()}
with open(sys.argv[1], "w") as out:
    json.dump(seen, out)
"""


def _pipeline(root: Path) -> None:
    """Two stages, the second after the first, each recording the Ray it connected to."""
    (root / "stage.py").write_text(STAGE_SCRIPT)
    stages = {
        name: {
            "cmd": f"python stage.py {name}.json",
            "deps": ["stage.py", *after],
            "outs": [{f"{name}.json": {"cache": False}}],
        }
        for name, after in (("first", []), ("second", ["first.json"]))
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))


def test_the_stages_of_one_run_share_a_local_ray_that_stops_with_it(tmp_path):
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    subprocess.run([f"{bin_dir}/dvc", "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    _pipeline(tmp_path)

    run = run_command([f"{bin_dir}/dlpipe", "run"], tmp_path, env, timeout_s=300)
    assert run.returncode == 0, run.stdout + run.stderr
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("first", "second"))
    assert first["gcs"] == second["gcs"]
    # A local instance: a setting asking for more CPUs than it has fails at once, as with
    # a stage's own Ray, rather than waiting for an autoscaler.
    assert first["joined"] is False and second["joined"] is False
    host, port = first["gcs"].rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):  # the instance stopped with the command
        socket.create_connection((host, int(port)), timeout=5).close()

    again = run_command([f"{bin_dir}/dlpipe", "run"], tmp_path, env, timeout_s=120)
    assert again.returncode == 0 and "up to date" in again.stdout + again.stderr
    assert json.loads((tmp_path / "first.json").read_text()) == first  # nothing re-ran


def test_a_run_given_ray_address_adds_no_instance_of_its_own(monkeypatch):
    from pipelines.training.cluster import local_ray_for_stages

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # never reached: nothing connects
    with local_ray_for_stages() as ray_env:
        assert ray_env == {}
