"""pipelines/stagekit/dag.py's plan: the stages `dvc repro` would run, cut into chains, over a real
DVC repository (no stage runs here: tests/cluster/test_shared_local_ray.py runs them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.stagekit.dag import plan_chains

# a -> b -> c, a -> d (a has two dependents: b and d start new chains), e alone,
# f after c and d.
EDGES = {"a": [], "b": ["a"], "c": ["b"], "d": ["a"], "e": [], "f": ["c", "d"]}


@pytest.fixture
def repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    stages = {
        name: {
            "cmd": f"echo {name} > {name}.txt",
            "deps": [f"{up}.txt" for up in ups] or ["source.txt"],
            "outs": [{f"{name}.txt": {"cache": False}}],
        }
        for name, ups in EDGES.items()
    }
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (tmp_path / "source.txt").write_text("data\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def shape(chains) -> list[tuple[list[str], list[str]]]:
    """Each chain's stages, with the last stage of each chain it waits for."""
    return [(c.stages, sorted(chains[i].stages[-1] for i in c.after)) for c in chains]


def test_every_stage_in_chains_that_wait_for_what_they_need(repository):
    assert shape(plan_chains([], force=False)) == [
        (["a"], []),
        (["b", "c"], ["a"]),
        (["d"], ["a"]),
        (["e"], []),
        (["f"], ["c", "d"]),
    ]


def test_a_target_brings_only_its_upstream_stages(repository):
    # Without d, a's one dependent is b: one chain, one DVC process.
    assert shape(plan_chains(["c"], force=False)) == [(["a", "b", "c"], [])]


def test_up_to_date_stages_are_left_out_and_their_dependents_kept(repository):
    dvc = str(Path(sys.executable).with_name("dvc"))
    subprocess.run([dvc, "repro", "-q"], cwd=repository, check=True)
    assert plan_chains([], force=False) == []
    (repository / "d.txt").write_text("changed by hand\n")  # d's output: d and f run again
    assert shape(plan_chains([], force=False)) == [(["d", "f"], [])]
    assert len(plan_chains([], force=True)) == 5  # --force: every stage


def test_an_unknown_target_is_left_to_dvc_to_name(repository):
    assert plan_chains(["nowhere"], force=False) is None


def test_a_stage_beside_others_waits_for_their_cpus_as_long_as_they_train(monkeypatch):
    from pipelines.training import cluster

    for name in (cluster.SIDE_BY_SIDE_ENV, cluster.LOCAL_RAY_ENV, "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert cluster.resource_wait_s() == cluster.LOCAL_WAIT_S  # its own Ray: a clear error
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster.resource_wait_s() == cluster.CLUSTER_WAIT_S  # time to add nodes
    monkeypatch.setenv(cluster.SIDE_BY_SIDE_ENV, "1")
    assert cluster.resource_wait_s() == cluster.SIDE_BY_SIDE_WAIT_S
