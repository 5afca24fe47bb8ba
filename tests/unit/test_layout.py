"""The folder tree is the design: checked from the code's own imports and dvc.yaml.

- every module a stage's command reaches is in that stage's `deps`, and no other code is
  (so `dvc repro` re-runs a stage whenever code it runs changes, and only then);
- no stage module imports another stage module (what two stages share lives below them);
- no import cycle in models/, pipelines/, serving/.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "pipelines", "serving")


def module_file(module: str) -> Path | None:
    """The project file that defines `module`, or None for a module outside the project."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _runtime_imports(tree: ast.AST) -> list[ast.AST]:
    """Import statements that run (at module level or inside functions), leaving out the
    `if TYPE_CHECKING:` blocks that only type checkers read."""
    found: list[ast.AST] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                found.append(child)
            visit(child)

    visit(tree)
    return found


@cache
def imports_of(module: str) -> frozenset[str]:
    """The project modules `module` imports: `from a.b import c` names module a.b.c when it
    exists, else a.b."""
    path = module_file(module)
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    reached: set[str] = set()
    for node in _runtime_imports(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative import
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names = [
                f"{base}.{alias.name}" if module_file(f"{base}.{alias.name}") else base
                for alias in node.names
            ]
        reached.update(name for name in names if module_file(name) is not None)
    return frozenset(reached - {module})


def closure(module: str) -> set[str]:
    """Every project module that importing `module` runs, packages' __init__ included."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        parts = current.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages
        todo.extend(imports_of(current))
    return seen


def has_code(path: Path) -> bool:
    """False for a file that holds only a docstring (most package __init__ files)."""
    body = ast.parse(path.read_text()).body
    return any(
        not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)) for node in body
    )


def stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict) -> str:
    match = re.search(r"python -m ([\w.]+)", stage["cmd"])
    assert match, f"not a `python -m` command: {stage['cmd']}"
    return match.group(1)


STAGE_MODULES = {name: stage_module(stage) for name, stage in stages().items()}


@pytest.mark.parametrize("name", sorted(STAGE_MODULES))
def test_every_module_a_stage_runs_is_in_its_deps(name):
    deps = [Path(d) for d in stages()[name].get("deps", []) if "${" not in d]
    reached = sorted(
        module_file(m).relative_to(REPO)
        for m in closure(STAGE_MODULES[name])
        if has_code(module_file(m))
    )
    missing = [str(f) for f in reached if not any(f == d or d in f.parents for d in deps)]
    assert not missing, f"{name}: its command runs these files, missing from deps: {missing}"
    # And no more: a code dep the command never runs would re-run the stage for nothing.
    code = [d for d in deps if d.parts[0] in PACKAGES]
    unused = [str(d) for d in code if not any(f == d or d in f.parents for f in reached)]
    assert not unused, f"{name}: deps list code its command never runs: {unused}"


def test_no_stage_module_imports_another():
    stage_modules = set(STAGE_MODULES.values())
    offenders = {
        module: sorted(imports_of(module) & (stage_modules - {module})) for module in stage_modules
    }
    assert not any(offenders.values()), {m: i for m, i in offenders.items() if i}


def all_modules() -> list[str]:
    modules = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return modules


def test_no_import_cycles():
    """Tarjan's strongly connected components over the runtime imports: a cycle, even one
    held together by an import inside a function, is a component of more than one module."""
    graph = {m: sorted(imports_of(m)) for m in all_modules()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, []):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in graph:
        if module not in index:
            connect(module)
    assert not cycles, cycles


def test_pipelines_reads_like_the_product():
    listing = sorted(p.name for p in (REPO / "pipelines").iterdir() if not p.name.startswith("_"))
    assert listing == [
        "cli.py",
        "review",
        "selfsupervised",
        "semisupervised",
        "stagekit",
        "supervised",
        "training",
        "tuning",
        "unsupervised",
    ]
