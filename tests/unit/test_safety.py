"""Nothing a user or the store supplies is loaded in a way that can run code: every
`torch.load` says weights_only=True, no pickle (or its relatives) at all, no numpy
pickles, no `yaml.load` (only safe_load). Checked in the source, so a new loader that
forgets is caught here, not in a review."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("pipelines", "serving", "models", "benchmarks")
UNPICKLERS = {"pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def calls(source: str):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name):
                yield owner.id, node.func.attr, node


def keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


def unsafe_loads(source: str, name: str) -> list[str]:
    found = []
    for owner, attr, call in calls(source):
        where = f"{name}:{call.lineno}"
        if owner == "torch" and attr == "load" and keyword(call, "weights_only") is not True:
            found.append(f"{where}: torch.load without weights_only=True")
        if owner in UNPICKLERS and attr in {"load", "loads", "open", "Unpickler"}:
            found.append(f"{where}: {owner}.{attr}")
        if owner in {"np", "numpy"} and attr == "load" and keyword(call, "allow_pickle"):
            found.append(f"{where}: np.load with allow_pickle=True")
        if owner == "yaml" and attr in {"load", "unsafe_load", "full_load"}:
            found.append(f"{where}: yaml.{attr} (use yaml.safe_load)")
    return found


def test_no_loader_in_the_code_can_run_what_a_file_holds():
    sources = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    assert len(sources) > 50
    problems = [
        problem
        for path in sources
        for problem in unsafe_loads(path.read_text(), str(path.relative_to(REPO)))
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("code", "problem"),
    [
        ("torch.load(path)", "without weights_only=True"),
        ("torch.load(path, weights_only=False)", "without weights_only=True"),
        ("pickle.loads(blob)", "pickle.loads"),
        ("np.load(path, allow_pickle=True)", "allow_pickle=True"),
        ("yaml.load(text)", "yaml.safe_load"),
    ],
)
def test_the_check_finds_each_unsafe_loader(code, problem):
    [found] = unsafe_loads(code, "example.py")
    assert problem in found
