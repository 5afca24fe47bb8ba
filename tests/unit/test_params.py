"""Each stage's `params:` list in dvc.yaml names exactly the params keys the stage reads.

A stage reads what its function declares with `Param` (pipelines/stagekit/config.py: a key
left out of a narrowed section raises when read) plus the `${...}` values its command line
passes it. If the list named fewer keys, `dvc repro` would miss a change that alters the
stage's output; if it named more, it would re-run the stage for nothing.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from pipelines.stagekit.config import SECTIONS, declared_keys, load_params
from tests.unit.test_layout import REPO, STAGE_MODULES, module_file, stages


def stage_function(module: str) -> Callable[..., Any]:
    """The function the module's `stage_command(...)` runs."""
    tree = ast.parse(module_file(module).read_text())
    calls = [
        node.args[0].id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "id", None) == "stage_command"
        and node.args
        and isinstance(node.args[0], ast.Name)
    ]
    assert len(calls) == 1, f"{module}: expected one stage_command(function) call"
    return getattr(importlib.import_module(module), calls[0])


def covered(key: str, by: set[str]) -> bool:
    """`train.lr` is covered by `train.lr` or by the whole `train`."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in by for i in range(1, len(parts) + 1))


def read_keys(name: str) -> set[str]:
    """What the stage reads: its declared keys, plus the params its command line passes it."""
    declared = set(declared_keys(stage_function(STAGE_MODULES[name])))
    passed = set(re.findall(r"\$\{([\w.]+)\}", stages()[name]["cmd"]))
    return declared | {key for key in passed if not covered(key, declared)}


@pytest.mark.parametrize("name", sorted(STAGE_MODULES))
def test_a_stage_lists_exactly_the_params_it_reads(name):
    listed = {p for p in stages()[name].get("params", []) if isinstance(p, str)}
    reads = read_keys(name)
    assert not reads - listed, f"{name} reads params its dvc.yaml entry does not list"
    assert not listed - reads, f"{name} lists params it never reads"


@pytest.mark.parametrize("name", sorted(STAGE_MODULES))
def test_the_repository_params_load_for_every_stage(name):
    load_params(stage_function(STAGE_MODULES[name]), REPO / "params.yaml")


def test_every_params_section_is_read_by_a_stage():
    in_file = set(yaml.safe_load((REPO / "params.yaml").read_text()))
    read = {key.split(".")[0] for name in STAGE_MODULES for key in read_keys(name)}
    assert in_file == read == set(SECTIONS)


@pytest.mark.parametrize("stage", sorted(STAGE_MODULES))
def test_every_params_key_a_stage_lists_is_written_in_params_yaml(stage):
    """DVC refuses to run (or commit) a stage whose listed key params.yaml lacks ("Parameters
    'train.beta1' are missing"), though the stage itself would take the field's default."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for entry in stages()[stage].get("params", []):
        for key in [entry] if isinstance(entry, str) else []:
            value: Any = params
            for part in key.split("."):
                assert isinstance(value, dict) and part in value, (
                    f"{stage} lists {key}, which params.yaml does not have"
                )
                value = value[part]
