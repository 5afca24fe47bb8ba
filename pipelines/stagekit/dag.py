"""`dlpipe run --jobs N`: the stages `dvc repro` would run, independent ones side by side.

Why: `dvc repro` runs one stage at a time, and a stage rarely keeps every core busy. On the
demo's 2 CPUs, sampled from /proc/stat over a cold `dlpipe run` (819 s), the CPUs were
busy 79% of the time: an export, an ingest or a prepare is one Python thread (53-56%), a
training stage's start-up (processes importing torch) and its baselines leave a core idle
too (65-93%), 339 core-seconds in all. There, side by side, the CPUs were busier but the
run no faster (825 s: the work is CPU-bound, and Ray runs one training job's workers at
a time; benchmarks/README.md, pipeline overhead). On a bigger machine or a Ray cluster,
two training stages that could each have their own cores or nodes wait for each other.

DVC lets separate processes share a workspace, and that is what this module uses: a stage's
command runs with the repository lock released (DVC's `unlocked_repo`), per-path read and
write locks keep processes off each other's outputs, and `--wait-for-lock` makes a process
wait for the repository lock (held while DVC hashes and records a stage) instead of
failing. The stages to run, and their order, are DVC's own: `dvc status` names the changed
ones, DVC's stage graph their dependents. They are cut into chains (a stage with one
upstream stage to run, which has it as its only dependent, joins that stage's chain), each
run by one `dvc repro --single-item A B C` (one DVC start-up for the chain) once the
chains it depends on have ended. Ray sorts out the CPUs the stages' jobs ask for: a job
waits for another's workers to finish, while its own stage process (imports, data,
baselines) goes on.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

__all__ = ["Chain", "pending_ray_groups", "plan_chains", "run_chains"]


@dataclass
class Chain:
    """Stages run one after the other by one `dvc repro --single-item` process."""

    stages: list[str]
    after: set[int] = field(default_factory=set)
    """The chains (indices) that must have ended before this one starts."""


def plan_chains(targets: Sequence[str], force: bool) -> list[Chain] | None:
    """The chains to run for `dvc repro [--force] TARGETS`, in an order that respects the
    graph: empty when nothing changed; None when DVC cannot tell (an unknown target, a
    broken dvc.yaml: `dvc repro` itself then names the error)."""
    import networkx as nx
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        # Waits for the repository lock, as the chains do, should another DVC hold it.
        with Repo(_wait_for_lock=True) as repo:
            # An edge goes from a stage to one it depends on. What runs follows DVC's
            # active graph, in which a frozen stage's edges are cut (`dvc repro` runs
            # nothing upstream of it); when it runs, the full graph's edges still order it.
            full = repo.index.graph
            active = full.copy()
            active.remove_edges_from([e for e in full.edges if e[0].frozen])
            wanted = [
                stage
                for target in (list(targets) or ["dvc.yaml"])  # `dvc repro`'s default
                for stage in repo.stage.collect(target)
            ]
            nodes = set(wanted).union(*(nx.descendants(active, s) for s in wanted))
            order = list(nx.dfs_postorder_nodes(full.subgraph(nodes)))  # upstream first
            names = {stage: stage.addressing for stage in order}
            if force:
                changed = set(order)
            else:
                status = repo.status(list(targets) or None, with_deps=True)
                changed = {s for s in order if names[s] in status}
    except DvcException:
        return None
    # A stage runs when it changed or a stage it depends on runs (`order` is upstream first).
    runs: set[Any] = set()
    for stage in order:
        if stage in changed or any(u in runs for u in active[stage] if u in nodes):
            runs.add(stage)
    to_run = [s for s in order if s in runs]
    upstream = {s: [u for u in full[s] if u in runs] for s in to_run}
    downstream: dict[Any, list[Any]] = {s: [] for s in to_run}
    for s in to_run:
        for u in upstream[s]:
            downstream[u].append(s)
    chains: list[Chain] = []
    chain_of: dict[Any, int] = {}
    for stage in to_run:
        ups = upstream[stage]
        if len(ups) == 1 and len(downstream[ups[0]]) == 1:
            index = chain_of[ups[0]]
            chains[index].stages.append(names[stage])
        else:
            index = len(chains)
            chains.append(Chain([names[stage]], {chain_of[u] for u in ups}))
        chain_of[stage] = index
    return chains


WAITING_POLL_S = 2.0
"""How often `run_chains` asks whether a chain waits for Ray."""


def pending_ray_groups() -> int:
    """Placement groups the connected Ray instance cannot place yet: a Train job or a
    K-means sweep waiting for another's CPUs, one a group. (Tune's queued trials count
    too, so a search may let one chain more start than the CPUs allow.)"""
    import ray

    table = ray.util.placement_group_table()
    return sum(1 for group in table.values() if group["state"] == "PENDING")


STAGE_LINE = re.compile(r"^Running stage '([^']+)'")


def run_chains(
    chains: Sequence[Chain],
    command: Sequence[str],
    env: dict[str, str],
    jobs: int,
    waiting: Callable[[], int] | None = None,
    out: IO[str] = sys.stdout,
) -> int:
    """Run each chain as `command + its stages`, `jobs` at once, each after the chains it
    depends on; each line a chain prints is prefixed with the stage it is running.
    `waiting` counts the chains that wait for Ray's resources (see `pending_ray_groups`):
    a chain that waits uses no CPU, so one more starts in its place, up to twice `jobs`.
    After a failure no chain starts and those running are waited for; the exit code is the
    first failure's. Ctrl-C and SIGTERM are passed on to every running chain's process
    group (see pipelines/cli.py `_run_and_wait`), and end the command once they stopped."""
    running: dict[int, subprocess.Popen] = {}
    ended: dict[int, int] = {}
    changed = threading.Condition()
    failed: list[int] = []
    stopping: list[int] = []

    def pass_on(signum: int, frame: object) -> None:
        stopping.append(signum)
        for process in list(running.values()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)

    def relay(index: int, process: subprocess.Popen) -> None:
        label = chains[index].stages[0]
        assert process.stdout is not None
        try:
            for line in process.stdout:
                if match := STAGE_LINE.match(line):
                    label = match.group(1)
                with contextlib.suppress(OSError, ValueError):  # a closed terminal or pipe
                    with changed:
                        out.write(f"{label} | {line}")
                        out.flush()
        finally:
            code = process.wait()
            with changed:
                ended[index] = code
                running.pop(index, None)
                if code != 0:
                    failed.append(index)
                changed.notify_all()

    def ready() -> Iterable[int]:
        for index, chain in enumerate(chains):
            if index not in ended and index not in running and chain.after <= ended.keys():
                if all(ended[i] == 0 for i in chain.after):
                    yield index

    def start(index: int) -> None:
        shown = " ".join(["dvc", *command[1:], *chains[index].stages])
        out.write(f"{chains[index].stages[0]} | $ {shown}\n")
        out.flush()
        process = subprocess.Popen(
            [*command, *chains[index].stages],
            env={**env, "PYTHONUNBUFFERED": "1"},  # lines as they come, through the pipe
            process_group=0,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
        running[index] = process
        if stopping:  # a signal came while it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, stopping[0])
        threading.Thread(target=relay, args=(index, process), daemon=True).start()

    def count_waiting() -> int:
        if waiting is None:
            return 0
        try:
            return waiting()
        except Exception:  # Ray did not answer: count none, as without it
            return 0

    handlers = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            idle = count_waiting()  # asked without the lock: the relays go on meanwhile
            with changed:
                if not failed and not stopping:
                    busy = len(running) - min(len(running), idle)
                    for index in list(ready()):
                        if busy >= jobs or len(running) >= 2 * jobs:
                            break
                        start(index)
                        busy += 1
                if not running:
                    break
                changed.wait(timeout=WAITING_POLL_S if waiting else None)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        with changed:
            left = list(running.values())
        for process in left:  # an error here: the chains must not outlive this process
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait()
    if stopping:
        return 128 + stopping[0]
    if failed:
        stages = ", ".join(chains[failed[0]].stages)
        left_out = [s for i, c in enumerate(chains) if i not in ended for s in c.stages]
        not_run = f"; not run: {', '.join(left_out)}" if left_out else ""
        print(f"failed: the chain {stages}{not_run}", file=sys.stderr, flush=True)
        code = ended[failed[0]]
        return code if code > 0 else 128 - code  # -N: killed by signal N
    return 0
