"""Where a served model came from, both ways.

Forward, when a stage runs: `stage_record` tags the stage's MLflow run with what DVC ran it
on (each dependency's sha256 and each params value of its dvc.yaml entry) and, under
`dvc exp run`, the experiment's name. Backward, from a registered version: `model_lineage`
follows registry version -> ONNX sha256 -> MLflow run (and its parent) -> git commit -> the
DVC stages (training and export) with those dependencies and params.

Why tags written at run time rather than dvc.lock read afterwards: the lock of the commit a
model was trained at may never be committed (a `dvc exp`, a dirty tree), and it keeps md5s;
the run's own tags are there as soon as the run is, on every tracking server.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipelines.stagekit.dataset import sha256_file
from pipelines.stagekit.errors import UserError

GRAPH_HASH_TAG = "sha256/"
"""Registry version tags `sha256/<graph file>`: each ONNX graph's hash, written at export
and checked by every replica before it serves the version (serving/model_checks.py)."""
REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
"""A registered model by alias (models:/NAME@ALIAS) or by version (models:/NAME/3)."""
DEP_TAG = "dvc/dep/"
"""Run tag `dvc/dep/<path>`: the sha256 of a dependency as the stage read it."""
PARAM_TAG = "dvc/param/"
"""Run tag `dvc/param/<key>`: a params value the stage ran with (dotted key, JSON value)."""
EXP_TAG = "dvc_exp"
"""Run tag: the `dvc exp run` experiment that made the run (absent under plain `dvc repro`)."""
EXP_BASELINE_TAG = "dvc_exp_baseline"
"""Run tag: the git commit the experiment branched from."""

TAG_VALUE_LIMIT = 5000
"""Longest params value kept as a tag (MLflow stores up to 8000 characters; beyond this
limit the tag holds the value's sha256, the run's params keep the value)."""
UNRECORDED_PARTS = frozenset({"__pycache__"})
"""Folders left out of a folder's hash: Python's byte-code caches differ between machines."""

_VARIABLE = re.compile(r"\$\{\s*([\w.]+)\s*\}")
_TAG_KEY_UNSAFE = re.compile(r"[^\w.\- /:]")


def sha256_tree(path: str | Path) -> str:
    """A file's sha256, or a folder's: the sha256 of its sorted `relative path  sha256`
    lines, so that renaming, adding or changing any file changes it."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    lines = sorted(
        f"{file.relative_to(path).as_posix()}  {sha256_file(file)}"
        for file in path.rglob("*")
        if file.is_file() and not UNRECORDED_PARTS.intersection(file.relative_to(path).parts)
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def dvc_stage_name(stage: str) -> str:
    """The dvc.yaml stage running this process (DVC_STAGE), else the module's own `stage`:
    one module runs as several stages (evaluate as evaluate_pseudolabel, ...)."""
    return os.environ.get("DVC_STAGE") or stage


def stage_record() -> dict[str, str]:
    """Tags for a run of the stage DVC runs (DVC_STAGE): its dependencies' sha256 and params
    values, plus the `dvc exp` name and baseline under `dvc exp run`. Nothing when a stage
    function is called directly: it read whatever paths it was given, so nothing is claimed."""
    tags: dict[str, str] = {}
    if os.environ.get("DVC_EXP_NAME"):
        tags[EXP_TAG] = os.environ["DVC_EXP_NAME"]
        tags[EXP_BASELINE_TAG] = os.environ.get("DVC_EXP_BASELINE_REV", "")
    if os.environ.get("DVC_STAGE"):
        # The working directory, not DVC_ROOT: `dvc exp run --temp` runs in a copy holding
        # the experiment's params, and DVC_ROOT names the user's repository there.
        tags.update(_dvc_inputs(os.environ["DVC_STAGE"], Path.cwd()))
    return tags


@functools.cache  # a stage opening several runs (pseudo-label rounds) hashes once
def _dvc_inputs(stage: str, root: Path) -> dict[str, str]:
    params = _read(root / "params.yaml")
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    entry = dvc_yaml["stages"].get(stage)
    if entry is None:  # a foreach/matrix stage (name@item): not one of dlpipe's
        return {}
    variables = {**params, **_dvc_vars(dvc_yaml.get("vars", []))}
    tags = {}
    for dep in entry.get("deps", []):
        path = _resolve(str(dep), variables).rstrip("/")
        target = root / path
        tags[_tag_key(DEP_TAG, path)] = sha256_tree(target) if target.exists() else "missing"
    for item in entry.get("params", []):
        # `- key` reads params.yaml; `- file: [keys]` another file (null: all its keys).
        files = {"params.yaml": [item]} if isinstance(item, str) else item
        for file, keys in files.items():
            values = params if file == "params.yaml" else _read(root / file)
            prefix = "" if file == "params.yaml" else f"{file}:"
            for key in keys if keys is not None else list(values):
                for flat_key, value in _flatten(key, _lookup(values, key)).items():
                    tags[_tag_key(PARAM_TAG, prefix + flat_key)] = _tag_value(value)
    return tags


def _read(path: Path) -> dict[str, Any]:
    """A params file (YAML, or JSON, which YAML reads), {} when absent."""
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _dvc_vars(entries: list[Any]) -> dict[str, Any]:
    """dvc.yaml's own `vars:` (mappings; file names among them are left to DVC)."""
    merged: dict[str, Any] = {}
    for entry in entries:
        if isinstance(entry, Mapping):
            merged.update(entry)
    return merged


def _tag_key(prefix: str, name: str) -> str:
    # MLflow tag keys allow letters, digits, _ - . space / : only, and at most 250 of them.
    return (prefix + _TAG_KEY_UNSAFE.sub("_", name.lstrip("/")))[:250]


def _tag_value(value: Any) -> str:
    text = json.dumps(value, default=str)  # default: YAML dates and the like
    if len(text) > TAG_VALUE_LIMIT:
        return json.dumps({"sha256": hashlib.sha256(text.encode()).hexdigest()})
    return text


def _resolve(text: str, params: Mapping[str, Any]) -> str:
    """dvc.yaml's `${key}` interpolation, from params.yaml and dvc.yaml's vars (DVC's own);
    a name neither holds stays as written."""

    def value(match: re.Match[str]) -> str:
        try:
            return str(_lookup(params, match.group(1)))
        except (KeyError, TypeError):
            return match.group(0)

    return _VARIABLE.sub(value, text)


def _lookup(params: Mapping[str, Any], dotted: str) -> Any:
    value: Any = params
    for part in dotted.split("."):
        value = value[part]
    return value


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flatten(f"{prefix}.{key}", inner))
        return flat
    return {prefix: value}


# --- backward: from a registered version to its data ------------------------------------


def parse_model_ref(
    reference: str, version: str | None = None
) -> tuple[str, str | None, str | None]:
    """(name, alias, version) from `models:/NAME@ALIAS`, `models:/NAME/3`, or a bare NAME
    with `version` (the `model` and `version` of an HTTP answer)."""
    if reference.startswith("models:/"):
        match = REGISTRY_URI.match(reference)
        if match is None or version is not None:
            raise UserError(
                f"{reference!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION, or NAME VERSION"
            )
        return match["name"], match["alias"], match["version"]
    if version is None:
        raise UserError(f"{reference!r}: give a version (NAME VERSION) or models:/NAME@ALIAS")
    if not version.isdigit():
        raise UserError(f"version {version!r} of {reference}: expected a number")
    return reference, None, version


def model_lineage(client: Any, name: str, alias: str | None, version: str | None) -> dict:
    """The chain behind one registered version, from MLflow `client`; a UserError naming
    what does not exist (model, alias, version)."""
    version = _find_version(client, name, alias, version)
    model_version = client.get_model_version(name, version)
    tags = model_version.tags
    run_id = tags.get("source_run") or model_version.run_id
    run = _run_summary(client, run_id)
    found = run is not None and not run.get("missing")
    parent_id = run["tags"].get("mlflow.parentRunId") if found else None
    export_runs = client.search_runs(
        [run["experiment_id"]] if found else _all_experiments(client),
        filter_string=f"tags.registered_model = '{name}' and tags.model_version = '{version}'",
        max_results=1,
    )
    stages = [_stage(run)] if found else []
    if export_runs and export_runs[0].info.run_id != run_id:
        stages.append(_stage(_run_summary(client, export_runs[0].info.run_id)))
    return {
        "registered_model": name,
        "version": version,
        "aliases": sorted(model_version.aliases or []),
        "onnx_sha256": {
            key[len(GRAPH_HASH_TAG) :]: value
            for key, value in tags.items()
            if key.startswith(GRAPH_HASH_TAG)
        },
        "run": _public(run),
        "parent_run": _public(_run_summary(client, parent_id)) if parent_id else None,
        "git_commit": tags.get("git_commit") or (run["tags"].get("git_commit") if run else None),
        "stages": stages,
    }


def _find_version(client: Any, name: str, alias: str | None, version: str | None) -> str:
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = sorted(m.name for m in client.search_registered_models())
        raise UserError(
            f"no registered model {name!r} (registered: {', '.join(known) or 'none'})"
        ) from None
    aliases = dict(getattr(registered, "aliases", {}) or {})
    if alias is not None:
        if alias not in aliases:
            have = ", ".join(f"@{a}" for a in sorted(aliases)) or "none"
            raise UserError(f"{name} has no alias {alias!r} (aliases: {have})")
        return str(aliases[alias])
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    if int(str(version)) not in versions:
        have = ", ".join(map(str, versions)) or "none"
        raise UserError(f"{name} has no version {version} (versions: {have})")
    return str(int(str(version)))


def _all_experiments(client: Any) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def _run_summary(client: Any, run_id: str | None) -> dict | None:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return {"id": run_id, "missing": True, "tags": {}, "experiment_id": None}
    experiment = client.get_experiment(run.info.experiment_id)
    return {
        "id": run_id,
        "name": run.info.run_name,
        "experiment": experiment.name if experiment else None,
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "tags": dict(run.data.tags),
    }


def _public(run: dict | None) -> dict | None:
    if run is None:
        return None
    return {k: v for k, v in run.items() if k not in ("tags", "experiment_id")}


def _stage(run: dict) -> dict:
    tags = run["tags"]
    return {
        "stage": tags.get("dvc_stage"),
        "run": run["id"],
        "git_commit": tags.get("git_commit"),
        "dvc_exp": tags.get(EXP_TAG),
        "data_sha256": tags.get("data_sha256"),
        "deps": {k[len(DEP_TAG) :]: v for k, v in sorted(tags.items()) if k.startswith(DEP_TAG)},
        "params": {
            k[len(PARAM_TAG) :]: _json_or_text(v)
            for k, v in sorted(tags.items())
            if k.startswith(PARAM_TAG)
        },
    }


def _json_or_text(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:  # written by hand, or by another tool
        return value


def format_lineage(chain: Mapping[str, Any]) -> str:
    """The chain as the lines `dlpipe lineage` prints, top (served) to bottom (data)."""
    aliases = " ".join(f"@{a}" for a in chain["aliases"])
    lines = [
        f"model      {chain['registered_model']} version {chain['version']} {aliases}".rstrip()
    ]
    for graph, digest in sorted(chain["onnx_sha256"].items()):
        lines.append(f"onnx       {graph} sha256 {digest}")
    for label, run in (("run", chain["run"]), ("parent", chain["parent_run"])):
        if run is not None:
            where = (
                "(not in this tracking store)"
                if run.get("missing")
                else (f"{run['name']} in {run['experiment']} ({run['status']})")
            )
            lines.append(f"{label:<10} {run['id']} {where}")
    lines.append(f"git        {chain['git_commit'] or 'unknown'}")
    for stage in chain["stages"]:
        exp = f", dvc exp {stage['dvc_exp']}" if stage["dvc_exp"] else ""
        lines.append(f"stage      {stage['stage']} (run {stage['run']}{exp})")
        if not stage["deps"] and not stage["params"]:
            lines.append("             not run by DVC: its dependencies were not recorded")
        for path, digest in stage["deps"].items():
            lines.append(f"  dep      {path} sha256 {digest}")
        for key, value in stage["params"].items():
            lines.append(f"  param    {key} = {json.dumps(value)}")
    return "\n".join(lines)
